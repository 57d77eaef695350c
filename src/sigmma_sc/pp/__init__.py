"""Preprocessing: neighbourhood graphs, nuclei, the micro / meso / macro hierarchy, patches and image features."""
