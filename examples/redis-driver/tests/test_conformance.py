"""The whole channels-lite conformance suite against the Redis driver.

Needs a Redis server: ``CHANNELS_LITE_TEST_REDIS_URL=redis://127.0.0.1:6379/0``. Without it the
tests are skipped locally and fail in CI (``CI`` set), so CI never passes by skipping.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from channels_lite.conformance import ConformanceTests

URL = os.environ.get("CHANNELS_LITE_TEST_REDIS_URL")


class TestRedisConformance(ConformanceTests):
    @pytest.fixture
    def driver_options(self) -> Iterator[dict[str, Any]]:
        if not URL:
            if os.environ.get("CI"):
                pytest.fail("CI is set but CHANNELS_LITE_TEST_REDIS_URL is not")
            pytest.skip("set CHANNELS_LITE_TEST_REDIS_URL to run the Redis driver tests")
        prefix = f"cl-test-{uuid.uuid4().hex}:"  # a fresh, empty keyspace per test
        yield {"driver": "redis", "url": URL, "prefix": prefix}
        client = redis.Redis.from_url(URL)
        try:
            names = list(client.scan_iter(match=f"{prefix}*", count=1000))
            if names:
                client.unlink(*names)
        finally:
            client.close()
