"""Test support: a real local registry, a deterministic image catalog and a fault-injecting proxy.

Used by ``tests/conftest.py`` (session fixtures) and by benchmarks in ``bench/``.
Nothing here is imported by ``fetchd`` itself.
"""
