"""Input: validation of SpatialData objects and conversion from plain AnnData + image."""
