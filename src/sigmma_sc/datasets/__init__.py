"""Real public data sets as SpatialData objects, and a synthetic tissue generator."""
