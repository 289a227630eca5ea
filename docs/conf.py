# Sphinx configuration of astro_zackay, built on sphinx-astropy.
# OFFLINE_DOCS=1 turns intersphinx off so that the docs build with -W without a network.
import os
from importlib.metadata import version as _version

from sphinx_astropy.conf.v2 import *  # noqa: F403

project = "astro_zackay"
author = "astro_zackay developers"
copyright = "2026, astro_zackay developers"
release = _version("astro_zackay")
version = ".".join(release.split(".")[:2])

exclude_patterns.append("_templates")  # noqa: F405
html_title = f"{project} v{release}"
nitpicky = False
automodapi_toctreedirnm = "api"
automodsumm_inherited_members = False
numpydoc_show_class_members = False

if os.environ.get("OFFLINE_DOCS"):
    intersphinx_mapping.clear()  # noqa: F405
else:
    intersphinx_mapping.update(  # noqa: F405
        {
            "ccdproc": ("https://ccdproc.readthedocs.io/en/latest/", None),
            "photutils": ("https://photutils.readthedocs.io/en/stable/", None),
        }
    )

# Figures of the tutorials: the code of every ``.. plot::`` block runs at build time.
if "matplotlib.sphinxext.plot_directive" not in extensions:  # noqa: F405
    extensions.append("matplotlib.sphinxext.plot_directive")  # noqa: F405
plot_include_source = True
plot_html_show_source_link = False
plot_html_show_formats = False
plot_formats = [("png", 80)]
plot_rcparams = {"figure.max_open_warning": 0}
