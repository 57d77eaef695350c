"""Preprocessing: neighbourhood graphs, nuclei, the micro / meso / macro hierarchy, patches and image features."""

from ._graphs import spatial_graphs
from ._hierarchy import Hierarchy, Level, build_hierarchy, get_hierarchy
from ._nuclei import segment_nuclei
