"""Sphinx configuration for sigmma-sc (scverse cookiecutter style).

Build: ``sphinx-build -W -b html docs docs/_build/html`` (or ``bash scripts/build_docs.sh``).

Intersphinx needs the network. Offline builds keep passing with warnings as errors: set
``SIGMMA_DOCS_INTERSPHINX=0`` to switch it off, ``=1`` to force it on; by default it is on only
when docs.python.org answers within two seconds (so Read the Docs links to anndata / scanpy /
squidpy / spatialdata / torch, and an offline laptop builds without fetch warnings).
"""

from __future__ import annotations

import os
import re
import socket
import sys
from datetime import datetime
from importlib.metadata import metadata
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "src"))

# -- project -------------------------------------------------------------------------------
info = metadata("sigmma-sc")
project = "sigmma-sc"
author = "sigmma-sc developers"
copyright = f"{datetime.now():%Y}, {author}"
version = info["Version"]
release = version
repository_url = "https://github.com/sigmma-sc/sigmma-sc"

# -- general -------------------------------------------------------------------------------
extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinx_autodoc_typehints",
]
templates_path = ["_templates"]
exclude_patterns = [
    "_build",
    "Thumbs.db",
    ".DS_Store",
    "**.ipynb_checkpoints",
    # tutorials/notebooks links to the repository's tutorials/ folder: only notebooks are pages there.
    "tutorials/notebooks/**/*.md",
    "tutorials/notebooks/**/*.py",
    "tutorials/notebooks/**/*.rst",
    "tutorials/notebooks/*/**",
]
TUTORIALS = HERE.parent / "tutorials"
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
master_doc = "index"
default_role = "literal"
pygments_style = "default"
# The package writes non-ASCII (µm) in docstrings: keep it.
language = "en"

# -- autodoc / autosummary / napoleon --------------------------------------------------------
autosummary_generate = True
autodoc_member_order = "groupwise"
# Members come from the autosummary class template (docs/_templates/autosummary/class.rst): listing
# them here as well would document every attribute twice.
autodoc_default_options: dict[str, bool] = {}
autoclass_content = "class"
autodoc_typehints = "description"
typehints_use_signature = False
typehints_use_signature_return = False
always_document_param_types = False
typehints_document_rtype = True
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_include_init_with_doc = False
napoleon_use_rtype = True
napoleon_use_param = True
# Attributes sections as fields: the class template documents each attribute as an object already.
napoleon_use_ivar = True
napoleon_custom_sections = [("Params", "Parameters")]
# Heavy optional imports are real dependencies: never mock them (a broken import must fail).
autodoc_mock_imports: list[str] = []

# -- myst / myst-nb ------------------------------------------------------------------------
myst_enable_extensions = ["amsmath", "colon_fence", "deflist", "dollarmath", "html_image", "html_admonition"]
myst_heading_anchors = 3
# Tutorials are committed with their outputs and never executed by the docs build.
nb_execution_mode = "off"
nb_merge_streams = True

# -- intersphinx (network) -----------------------------------------------------------------
_INTERSPHINX = {
    "python": ("https://docs.python.org/3", None),
    "numpy": ("https://numpy.org/doc/stable/", None),
    "pandas": ("https://pandas.pydata.org/pandas-docs/stable/", None),
    "scipy": ("https://docs.scipy.org/doc/scipy/", None),
    "anndata": ("https://anndata.readthedocs.io/en/stable/", None),
    "scanpy": ("https://scanpy.readthedocs.io/en/stable/", None),
    "squidpy": ("https://squidpy.readthedocs.io/en/stable/", None),
    "spatialdata": ("https://spatialdata.scverse.org/en/stable/", None),
    "torch": ("https://docs.pytorch.org/docs/stable/", None),
    "matplotlib": ("https://matplotlib.org/stable/", None),
}


def _online(host: str = "docs.python.org", timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


_switch = os.environ.get("SIGMMA_DOCS_INTERSPHINX", "auto").lower()
use_intersphinx = _switch in ("1", "true", "yes") or (_switch == "auto" and _online())
intersphinx_mapping = _INTERSPHINX if use_intersphinx else {}
intersphinx_timeout = 10
if not use_intersphinx:
    print("[sigmma-sc docs] intersphinx off (offline or SIGMMA_DOCS_INTERSPHINX=0): external links are plain text.")

# -- html ----------------------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_static_path = ["_static"]
html_title = project
html_theme_options = {
    "repository_url": repository_url,
    "use_repository_button": True,
    "path_to_docs": "docs/",
    "navigation_with_keys": False,
    "show_toc_level": 2,
}
html_show_sphinx = False


# -- tutorials -----------------------------------------------------------------------------
def _drop_empty_tutorial_toctree(app, docname: str, source: list[str]) -> None:
    """Before the first notebook lands in tutorials/, its glob toctree would warn (an error under -W)."""
    if docname == "tutorials/index" and not any(TUTORIALS.glob("*.ipynb")):
        start = source[0].find("```{toctree}")
        if start >= 0:
            end = source[0].find("```", start + 3)
            source[0] = source[0][:start] + source[0][end + 3 :]


# -- docstrings: prose "Returns" sections ------------------------------------------------------
_HEADER = re.compile(r"^(-{3,}|={3,})$")


def _prose_returns(app, what, name, obj, options, lines: list[str]) -> None:
    """Render a prose ``Returns`` section (scanpy style) as one description, not as a return type.

    numpydoc reads every unindented line of ``Returns`` as ``name : type`` or a bare type, so
    ``The axes for one panel.`` became the return *type* and a literal broken over two lines
    became two broken fields. Sections whose first line is a sentence (three words or more, or
    ending with a period) and has no indented description become one nameless, typeless field
    (napoleon writes ``:returns: <prose>``); the type still comes from the annotation
    (sphinx-autodoc-typehints). Runs before napoleon.
    """
    for i in range(len(lines) - 1):
        if lines[i].strip() != "Returns" or not _HEADER.match(lines[i + 1].strip()):
            continue
        end = i + 2
        while end < len(lines) and not (
            end + 1 < len(lines) and lines[end].strip() and _HEADER.match(lines[end + 1].strip())
        ):
            end += 1
        body = lines[i + 2 : end]
        while body and not body[-1].strip():
            body.pop()
        if not body or " : " in body[0] or any(line.startswith((" ", "\t")) for line in body):
            return
        first = body[0].strip()
        if len(first.split()) < 3 and not first.endswith("."):
            return  # a bare type such as ``pandas.DataFrame``
        # A lone ":" is a nameless, typeless numpydoc field: napoleon writes ``:returns: <prose>``.
        lines[i + 2 : i + 2 + len(body)] = [":", *(f"    {line.strip()}" for line in body)]
        return


def setup(app):
    app.connect("source-read", _drop_empty_tutorial_toctree)
    # Before napoleon (priority 500), which would read the prose as a type.
    app.connect("autodoc-process-docstring", _prose_returns, priority=400)
