"""The code of the example code chains (chains/code.yaml)."""
