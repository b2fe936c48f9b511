"""Benchmarks. Run them as modules from the repository root, e.g. `python -m bench.kernels`: run as a file, a
script's own folder goes first on sys.path and bench/kernels.py would shadow the `kernels` package that
transformers probes at import."""
