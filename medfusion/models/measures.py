"""Moved to `medfusion.measure.features` (0.9); this name stays until every importer has switched."""

from medfusion.measure.features import (
    FEATURES,
    class_roles,
    feret_diameter_mm,
    grid_spacing_zyx,
    lesion_features,
)

__all__ = ["FEATURES", "class_roles", "feret_diameter_mm", "grid_spacing_zyx", "lesion_features"]
