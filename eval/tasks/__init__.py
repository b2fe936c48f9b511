"""Offline lm-eval tasks authored from the held-out texts (YAML configs, data/ and the build script)."""
