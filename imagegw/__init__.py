"""Shifter image gateway: registry pulls, flattening, squashfs conversion, records."""

__version__ = "0.1.0"  # the same as pyproject.toml's and shifter.__version__ (a test checks)
