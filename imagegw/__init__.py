"""Shifter image gateway: registry pulls, flattening, squashfs conversion, records."""
