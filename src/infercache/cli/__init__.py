"""Typer front ends: they parse and present; the library does the work."""
