"""Sphinx configuration of the masked-diffusion documentation.

Build offline from the repository root:

    sphinx-build -W --keep-going -b html docs docs/_build/html

The example notebooks in ``examples/`` are copied to ``docs/examples/`` (ignored by
git) and executed by myst-nb on every build, so a notebook that fails breaks the
build. Set ``NB_EXECUTION_MODE=cache`` to reuse outputs of unchanged notebooks, or
``off`` to skip execution while editing prose.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

DOCS_DIR = Path(__file__).resolve().parent
REPO_DIR = DOCS_DIR.parent
sys.path.insert(0, str(DOCS_DIR / "_ext"))

import masked_diffusion  # noqa: E402  (after the path setup above)

project = "masked-diffusion"
author = "The masked-diffusion developers"
copyright = "2026, The masked-diffusion developers"
release = masked_diffusion.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_nb",
    "config_reference",
    "cli_reference",
    "api_reference",
    "source_notes",
]

exclude_patterns = ["_build", "jupyter_execute", "**.ipynb_checkpoints", "_ext"]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}

# -- autodoc / napoleon -----------------------------------------------------------------
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"
autodoc_default_options = {"members": True, "show-inheritance": True}
autoclass_content = "class"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# ":ivar:" fields instead of attribute directives, so dataclass fields documented in
# the class docstring are not documented twice.
napoleon_use_ivar = True
napoleon_use_rtype = False

# -- MyST and notebook execution --------------------------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
nb_execution_mode = os.environ.get("NB_EXECUTION_MODE", "force")
nb_execution_timeout = 600  # seconds per cell
nb_execution_raise_on_error = True
nb_execution_allow_errors = False
nb_merge_streams = True

# Math renders with MathJax 3, which the pages load from its CDN when viewed.

# -- HTML -------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"masked-diffusion {release}"

# No intersphinx: the build must work without network access.


def _copy_example_notebooks() -> None:
    """Copy ``examples/*.ipynb`` into ``docs/examples/`` so that myst-nb finds them."""
    source = REPO_DIR / "examples"
    target = DOCS_DIR / "examples"
    target.mkdir(exist_ok=True)
    current = {path.name for path in source.glob("*.ipynb")}
    for stale in target.glob("*.ipynb"):
        if stale.name not in current:
            stale.unlink()
    for notebook in sorted(source.glob("*.ipynb")):
        destination = target / notebook.name
        if not destination.exists() or destination.read_bytes() != notebook.read_bytes():
            shutil.copyfile(notebook, destination)


_copy_example_notebooks()
