"""Helpers that make real caches for the demo, tests and benches (Triton compiles, replicated entries); not used by the tool itself."""
