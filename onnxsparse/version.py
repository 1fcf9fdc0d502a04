"""The package version, in a module of its own: the CLI reads it without importing the package's API."""

__version__ = "0.1.0"
