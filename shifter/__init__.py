"""Shifter command-line front ends.

Kept empty of imports: ``shifter`` (``shifter.launch``) starts once per task on every node.
"""

__version__ = "0.1.0"  # the same as pyproject.toml's (a test checks)
