"""The conformance suite against the in-process ``memory`` driver."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from channels_lite.conformance import ConformanceTests


class TestMemoryDriver(ConformanceTests):
    @pytest.fixture
    def driver_options(self) -> dict[str, Any]:
        # A named store per test: every layer and driver instance of the test shares it,
        # and no other test sees it.
        return {"driver": "memory", "store": f"conformance-{uuid.uuid4().hex}"}
