"""The channels-lite conformance suite, shipped so that any driver can be checked after install.

Subclass :class:`ConformanceTests` in a pytest module and override one fixture::

    import pytest
    from channels_lite.conformance import ConformanceTests

    class TestMyDriver(ConformanceTests):
        @pytest.fixture
        def driver_options(self, tmp_path):
            return {"driver": "mydriver", "path": str(tmp_path / "db")}

``driver_options`` is the ``CONFIG`` a user would write; it must point at storage no other test
shares. Two tiers run: :class:`DriverTests` checks the driver contract directly (atomicity,
capacity, FIFO, expiry at exact boundaries, competing instances), :class:`LayerTests` checks every
item of the project's SPEC.md through ``ChannelLayer``. Optional capabilities (liveness, stats,
change notification, cross-process, persistence) are skipped with a reason when a driver does
not declare them. Async tests are marked explicitly, so pytest-asyncio's strict mode works.
"""

from __future__ import annotations

import pytest

# Rich assertion messages for the test modules below, as pytest gives its own test files.
pytest.register_assert_rewrite(
    "channels_lite.conformance.driver_tests",
    "channels_lite.conformance.layer_tests",
    "channels_lite.conformance._support",
)

from ._support import ConformanceFixtures  # noqa: E402
from .clock import ManualClock  # noqa: E402
from .driver_tests import DriverTests  # noqa: E402
from .layer_tests import LayerTests  # noqa: E402

__all__ = [
    "ConformanceFixtures",
    "ConformanceTests",
    "DriverTests",
    "LayerTests",
    "ManualClock",
]


class ConformanceTests(DriverTests, LayerTests):
    """Both tiers. Override the ``driver_options`` fixture in a subclass."""
