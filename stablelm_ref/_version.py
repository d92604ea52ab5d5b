"""The package version, in one place: pyproject.toml reads it, and so do the CLI and trace files.

Its own module so that cli.py and trace.py can name it without importing the package's __init__
(which imports them back: an import cycle).
"""

__version__ = "0.1.0"
