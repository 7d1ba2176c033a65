"""The rate-limited logging helper used where a loop could flood the log."""

from __future__ import annotations

import logging
import threading

import pytest

from channels_lite.core.ratelimit import RateLimitedLog


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def limited(clock: Clock) -> RateLimitedLog:
    return RateLimitedLog(logging.getLogger("test.ratelimit"), interval=60.0, clock=clock)


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "test.ratelimit"]


def test_first_then_one_per_interval_with_count(
    limited: RateLimitedLog, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="test.ratelimit")
    assert limited.warning("decode", "bad message on %r", "chat")
    for _ in range(500):
        clock.now += 0.01
        assert not limited.warning("decode", "bad message on %r", "chat")
    clock.now += 60
    assert limited.warning("decode", "bad message on %r", "chat")
    assert messages(caplog) == [
        "bad message on 'chat'",
        "bad message on 'chat' (and 500 more in the last 65s)",
    ]
    assert [r.levelno for r in caplog.records] == [logging.WARNING] * 2


def test_keys_are_independent(limited: RateLimitedLog, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="test.ratelimit")
    assert limited.info(("skip", "g1"), "group %s", "g1")
    assert limited.info(("skip", "g2"), "group %s", "g2")
    assert not limited.info(("skip", "g1"), "group %s", "g1")
    assert messages(caplog) == ["group g1", "group g2"]


def test_disabled_level_costs_nothing(
    limited: RateLimitedLog, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="test.ratelimit")
    assert not limited.debug("k", "claimed %d", 3)
    # A suppressed DEBUG line does not hold back the next WARNING of the same key.
    assert limited.warning("k", "trouble")
    assert messages(caplog) == ["trouble"]


def test_exception_carries_traceback_and_caller(
    limited: RateLimitedLog, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="test.ratelimit")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        assert limited.exception("loop", "housekeeping failed")
        assert not limited.exception("loop", "housekeeping failed")
    assert limited.log(logging.ERROR, "direct", "through log()")
    record, direct = caplog.records
    assert record.exc_info is not None
    assert record.exc_info[0] is RuntimeError
    # The records name the caller, not the helper.
    assert record.filename == direct.filename == "test_ratelimit.py"


def test_flush_reports_pending_counts(
    limited: RateLimitedLog, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="test.ratelimit")
    limited.info("a", "skipped %d member(s)", 1)
    limited.info("a", "skipped %d member(s)", 2)
    limited.info("a", "skipped %d member(s)", 3)
    limited.info("b", "quiet")
    clock.now += 10
    assert limited.flush() == 1
    assert limited.flush() == 0
    assert messages(caplog)[-1] == "skipped 3 member(s) (2 times in the last 10s)"


def test_key_table_is_bounded(clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="test.ratelimit")
    limited = RateLimitedLog(logging.getLogger("test.ratelimit"), max_keys=3, clock=clock)
    for n in range(100):
        limited.info(n, "key %d", n)
    assert len(limited._windows) == 3


def test_negative_interval_refused() -> None:
    with pytest.raises(ValueError, match="interval"):
        RateLimitedLog(logging.getLogger("x"), interval=-1)


def test_threads_log_once(limited: RateLimitedLog, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="test.ratelimit")
    barrier = threading.Barrier(8)

    def hammer() -> None:
        barrier.wait()
        for _ in range(200):
            limited.info("shared", "once")

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert messages(caplog) == ["once"]
