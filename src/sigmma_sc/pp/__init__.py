"""Preprocessing: neighbourhood graphs, nuclei, the micro / meso / macro hierarchy, patches and image features."""

from ._encoders import Encoder, available_encoders, encoder_from_module, get_encoder, register_encoder
from ._features import get_features, image_features, section_features, standardize_features
from ._graphs import spatial_graphs
from ._hierarchy import Hierarchy, Level, build_hierarchy, get_hierarchy
from ._nuclei import segment_nuclei
from ._patches import extract_patches, iter_crops
from ._stain import fit_stain_normalizer, hed_jitter, normalize_stain
