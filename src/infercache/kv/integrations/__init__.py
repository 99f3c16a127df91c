"""Integrations that put the KV engine to work inside model runtimes (transformers today).

Each integration module imports its runtime lazily; importing this package costs nothing.
"""
