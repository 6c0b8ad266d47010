"""Thin stage entry points: each parses its config, calls one library function, prints where output went."""
