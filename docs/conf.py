"""Sphinx configuration: API reference from the docstrings, guides in MyST, notebooks unexecuted.

Built offline: MathJax comes from the ``sphinx-mathjax-offline`` package, and links to jax, optax
and flax objects are plain links (no intersphinx inventories are fetched). ``nitpicky`` makes a
broken reference to an optax_rlx object a warning, which ``-W`` turns into an error.
"""

import pathlib
import shutil
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import optax  # noqa: E402
from sphinx.util.typing import stringify_annotation  # noqa: E402

import optax_rlx  # noqa: E402
from optax_rlx._adafactor_plan import FactoringRule  # noqa: E402

project = "optax_rlx"
author = "optax_rlx developers"
copyright = "2026, optax_rlx developers"
release = optax_rlx.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinx-mathjax-offline",
    "myst_nb",
]

# Google-style docstrings, the order of the source, signatures without the module path.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"exclude-members": "_asdict, _fields, _field_defaults, _make, _replace"}
add_module_names = False

# Every optax_rlx reference must resolve; names of other libraries are not documented here.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(jax|jnp|optax|numpy|np|flax|nnx|chex|typing|collections)(\..*)?"),
    (r"py:.*", r"(Any|Callable|NamedTuple|ScalarOrSchedule|Updates|Schedule|ArrayTree|Array)"),
    (r"py:.*", r"(int|float|str|bool|tuple|list|dict|None)"),
    (r"py:.*", r"FactoringRule"),
]

# Notebooks are rendered from their saved outputs, never executed at build time.
nb_execution_mode = "off"
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 4
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "**.ipynb_checkpoints"]
# The README's benchmark tables (included on the Benchmarks page) sit under H4 headings, as
# compare.py writes them.
suppress_warnings = ["mystnb.unknown_mime_type", "myst.header"]

html_theme = "sphinx_book_theme"
html_title = "optax_rlx"
html_theme_options = {
    "repository_url": "https://github.com/optax-rlx/optax_rlx",
    "use_repository_button": False,
    "show_toc_level": 2,
}


def _name_type_aliases(app, what, name, obj, options, signature, return_annotation):
  """Signatures name type aliases (``optax.ScalarOrSchedule``, ``optax.Schedule``,
  ``FactoringRule``) instead of the unions they expand to at runtime."""
  del app, what, name, obj, options
  if signature is None:
    return None
  aliases = [(optax.ScalarOrSchedule, "optax.ScalarOrSchedule"), (optax.Schedule, "optax.Schedule"),
             (FactoringRule, "FactoringRule")]
  for alias, alias_name in aliases:
    for mode in ("smart", "fully-qualified-except-typing", "fully-qualified"):
      text = stringify_annotation(alias, mode)
      signature = signature.replace(text, alias_name)
      if return_annotation:
        return_annotation = return_annotation.replace(text, alias_name)
  return signature, return_annotation


_REPOSITORY_FILES = "https://raw.githubusercontent.com/optax-rlx/optax_rlx/main/"


def _local_images(app, relative_path, parent_docname, content):
  """The README's images are absolute (they must work on a package index page); the pages that
  include it show the copies in this checkout, so the docs build and read offline."""
  del app, relative_path, parent_docname
  content[0] = content[0].replace(_REPOSITORY_FILES, "")


def setup(app):
  app.connect("autodoc-process-signature", _name_type_aliases)
  app.connect("include-read", _local_images)


def _copy_notebooks():
  """The notebooks live in ``notebooks/`` (Colab links point there); Sphinx reads a copy."""
  target = pathlib.Path(__file__).parent / "notebooks"
  target.mkdir(exist_ok=True)
  for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
    shutil.copyfile(notebook, target / notebook.name)


_copy_notebooks()
