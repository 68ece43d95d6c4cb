"""The name of the numerics mode the modules of this package register under."""

MODE = "mergekit"
