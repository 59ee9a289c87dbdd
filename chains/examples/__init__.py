"""Example code chains, one of each kind, loaded by `make run` from chains/code.yaml."""
