"""Input: validation of SpatialData objects and conversion from plain AnnData + image."""

from ._anndata import from_anndata
from ._image import SectionImage, conversion_for, image_levels
from ._validate import SlideData, validate

__all__ = ["validate", "SlideData", "SectionImage", "from_anndata", "image_levels", "conversion_for"]
