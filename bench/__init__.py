"""The EMDC benchmark: ``make bench`` or ``python -m bench [options]`` (see bench/__main__.py).

A developer tool, not part of the installed package: it measures the product
against the real brokers and is smoke-tested by tests/test_bench.py.
"""
