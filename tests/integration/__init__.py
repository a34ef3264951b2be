"""Integration tests: the pack inside a real ComfyUI (see docs/testing.md). A package, so that
its conftest is not confused with tests/conftest.py (both would be the module `conftest`)."""
