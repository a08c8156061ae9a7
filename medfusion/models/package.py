"""Moved (#29): model packages on disk are `medfusion/package/` (load, save, model.json's reader and
writer), the typed model.json `medfusion/models/meta.py`.

A forward kept only while the train/ modules being split out of `train/loop.py` (`loop.py`,
`packaging.py`, `cohort.py`, `finetune.py`), `train/calibrate.py` and `tests/test_train.py` still
import this path; delete it once they import the new homes.
"""

from medfusion.models.meta import (
    ARCHITECTURES,
    PACKAGE_FORMAT,
    PackageError,
    PackageMeta,
    external_weights,
    package_vocabulary,
    preprocess_config,
    upgrade_meta,
)
from medfusion.package.store import (
    DEFAULT_PACKAGE,
    load_package,
    read_meta,
    read_package_meta,
    save_package,
)

__all__ = [
    "ARCHITECTURES",
    "DEFAULT_PACKAGE",
    "PACKAGE_FORMAT",
    "PackageError",
    "PackageMeta",
    "external_weights",
    "load_package",
    "package_vocabulary",
    "preprocess_config",
    "read_meta",
    "read_package_meta",
    "save_package",
    "upgrade_meta",
]
