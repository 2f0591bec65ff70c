"""Shifter command-line front ends."""
