"""Model packages on disk: load, save, and read or write `model.json` (`store.py`).

The typed `model.json` (`PackageMeta`, `PackageError`) is defined in `medfusion/models/meta.py` and
re-exported here, so that a caller of packages needs one import.

Examples:
    >>> from medfusion.package import DEFAULT_PACKAGE, read_package_meta
    >>> read_package_meta(DEFAULT_PACKAGE).format
    'medfusion-model-package/2'
"""

from medfusion.models.meta import PACKAGE_FORMAT, PackageError, PackageMeta, preprocess_config
from medfusion.package.store import (
    DEFAULT_PACKAGE,
    load_domain_guard,
    load_package,
    read_meta,
    read_package_meta,
    save_domain_guard,
    save_package,
    write_package_meta,
)

__all__ = [
    "DEFAULT_PACKAGE",
    "PACKAGE_FORMAT",
    "PackageError",
    "PackageMeta",
    "load_domain_guard",
    "load_package",
    "preprocess_config",
    "read_meta",
    "read_package_meta",
    "save_domain_guard",
    "save_package",
    "write_package_meta",
]
