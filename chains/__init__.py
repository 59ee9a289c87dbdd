"""The chains `make run` loads: chain files (YAML) and the code their entrypoints name."""
