"""Option validation and registration; no Redis server needed."""

from __future__ import annotations

import pytest
from channels_lite_redis.driver import RedisDriver, _glob_escape, _redact

from channels_lite.drivers.base import DriverConfigError
from channels_lite.drivers.registry import available_drivers


def test_registered_through_the_entry_point() -> None:
    assert available_drivers()["redis"] is RedisDriver


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://localhost:6379/0", "redis://localhost:6379/0"),
        ("redis://user:s3cret@cache:6379/1", "redis://user:***@cache:6379/1"),
        ("rediss://:s3cret@cache/0", "rediss://:***@cache/0"),
    ],
)
def test_describe_never_shows_the_password(url: str, shown: str) -> None:
    assert _redact(url) == shown
    assert "s3cret" not in RedisDriver(url=url).describe()


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"url": "http://localhost"}, "url"),
        ({"url": 6379}, "url"),
        ({"prefix": ""}, "prefix"),
        ({"prefix": b"x"}, "prefix"),
        ({"hosts": [("localhost", 6379)]}, "hosts"),
    ],
)
def test_bad_options_refused_naming_the_key(options: dict[str, object], key: str) -> None:
    with pytest.raises(DriverConfigError) as info:
        RedisDriver(**options)  # type: ignore[arg-type]
    assert info.value.option == key


def test_scan_pattern_escapes_glob_characters() -> None:
    assert _glob_escape("a*b?[c]\\") == "a\\*b\\?\\[c\\]\\\\"


async def test_unopened_driver_says_so() -> None:
    from channels_lite.drivers.base import DriverError

    driver = RedisDriver()
    with pytest.raises(DriverError, match="not open"):
        await driver.group_channels("g", 0.0)
    await driver.close()  # safe on a never-opened instance
