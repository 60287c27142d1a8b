"""Benchmarks of pycr, its copy limits, and the side-by-side comparison with criu."""
