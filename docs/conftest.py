"""pytest settings for the docs folder: conf.py is Sphinx configuration, not a test module."""

collect_ignore = ["conf.py"]
