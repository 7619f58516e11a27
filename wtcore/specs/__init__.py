"""Built-in calculation specs, one module per family. Importing this package registers them."""

from . import norms, regularizers, units  # noqa: F401  (registration side effect)
