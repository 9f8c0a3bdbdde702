"""A fake engine and a fake executor, each one file and one registration (tests/test_registries.py)."""
