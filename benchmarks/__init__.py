"""Parity benchmarks: samjax vs the official PyTorch SAM, speed and numerics side by side.

Run `python -m benchmarks --help`; see `benchmarks/README.md` for what each number means.
Nothing here is imported by samjax itself. This package must not import jax or torch at
import time: `__main__` sets allocator environment variables before either is loaded.
"""
