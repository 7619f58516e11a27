"""Built-in calculation specs, one module per family. Importing this package registers them."""

from . import costs, importance, masks, norms, regularizers, sparsity, units  # noqa: F401  (registration side effect)
