"""Benchmarks: `pytest benchmarks/ --benchmark-only` (pyproject's testpaths is tests/, so give the path).

Files here are named bench_*.py, which pytest does not collect by default; this hook does.
"""

import pytest


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
