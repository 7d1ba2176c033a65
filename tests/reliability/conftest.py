"""Fixtures shared by the reliability tests."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from rel_parent import Children  # noqa: E402


@pytest.fixture
def children() -> Iterator[Children]:
    """Child processes started by the test, stopped (killed if need be) after it."""
    running = Children()
    try:
        yield running
    finally:
        running.stop_all()
