"""The conformance suite against the shipped ``sqlite`` driver."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from channels_lite.conformance import ConformanceTests


class TestSQLiteDriver(ConformanceTests):
    @pytest.fixture
    def driver_options(self, tmp_path: Path) -> dict[str, Any]:
        return {"driver": "sqlite", "path": str(tmp_path / "layer.sqlite3")}
