"""Readers of standard dataset layouts and files, returning plain arrays for the functional cores."""
