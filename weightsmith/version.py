"""The package version (one place: the package, the CLI and every merge report read it)."""

__version__ = "0.1.0"
