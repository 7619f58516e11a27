"""wtfront: lowers nn.Module models to the wt IR and binds programs to live models."""

from .trace import trace

__all__ = ["trace"]
