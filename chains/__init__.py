"""Chain files and the code they name (importable from the project root, where manage.py runs)."""
