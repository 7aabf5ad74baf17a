"""The instance catalogue: GPU (and a few CPU) instance types, their shapes and prices.

``load_catalog()`` reads the CSV shipped with strato (or a refreshed one);
``resolve()`` turns ``accelerators: A100:8`` into launch options, cheapest first;
``strato.catalog.update`` refreshes the file from the clouds' APIs. Nothing here imports
the launcher or a cloud SDK at import time.
"""

from strato.catalog.accelerators import (
    AcceleratorRequest,
    LaunchOption,
    check_available,
    parse_accelerators,
    parse_any_of,
    resolve,
)
from strato.catalog.data import (
    Catalog,
    CatalogError,
    InstanceOffer,
    load_catalog,
    normalize_accelerator,
)

__all__ = [
    "AcceleratorRequest",
    "Catalog",
    "CatalogError",
    "InstanceOffer",
    "LaunchOption",
    "check_available",
    "load_catalog",
    "normalize_accelerator",
    "parse_accelerators",
    "parse_any_of",
    "resolve",
]
