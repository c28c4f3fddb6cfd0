"""Benchmarks for twostage (run from the repository root: `python -m bench.<name>`). See bench/README.md."""
