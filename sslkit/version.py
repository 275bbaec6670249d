"""The version of sslkit (one place; the package and the plans written by it read it)."""

__version__ = "0.2.0"
