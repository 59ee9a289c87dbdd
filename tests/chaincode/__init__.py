"""Chain code as a chain owner writes it: tools and entrypoints the tests' chain files name.
Importable by the executor processes the tests start (they run from the project root)."""
