"""channels-lite 0.4 settings keep working: one test (at least) per option 0.4 accepted.

0.4's backends were ``channels_lite.layers.core.SQLiteChannelLayer`` and
``channels_lite.layers.aio.AIOSQLiteChannelLayer``; their CONFIG keys are listed in
``channels_lite.compat.OPTIONS_04``. Keys that changed meaning warn once (DeprecationWarning and
a log WARNING) saying what replaced them; keys that carried over stay silent.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sqlite3
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from channels.exceptions import ChannelFull
from django.conf import settings
from django.test import override_settings
from django.utils.functional import empty

from channels_lite import ChannelLayer, ConfigurationError
from channels_lite.compat import OPTIONS_04, UNLIMITED_CAPACITY, reset_warnings, translate_04
from channels_lite.layers import BaseSQLiteChannelLayer
from channels_lite.layers.aio import AIOSQLiteChannelLayer
from channels_lite.layers.core import SQLiteChannelLayer

# Tests record the deprecation warnings they expect explicitly; the rest is noise here.
pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:Overriding setting DATABASES:UserWarning"),
]

GUARD = 10.0
BACKENDS = [SQLiteChannelLayer, AIOSQLiteChannelLayer]
LayerClass = type[BaseSQLiteChannelLayer]


@pytest.fixture(scope="module", autouse=True)
def django_settings() -> Iterator[None]:
    configured_here = not settings.configured
    if configured_here:
        settings.configure(SECRET_KEY="channels-lite-tests", INSTALLED_APPS=[], USE_TZ=True)
    try:
        yield
    finally:
        if configured_here:
            settings._wrapped = empty


@pytest.fixture(autouse=True)
def fresh_warnings() -> Iterator[None]:
    reset_warnings()
    yield
    reset_warnings()


@pytest.fixture
def db_file(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "db.sqlite3"
    databases = {
        "default": {"ENGINE": "django.db.backends.sqlite3", "NAME": path},
        "other": {"ENGINE": "django.db.backends.sqlite3", "NAME": str(tmp_path / "other.db")},
        "pg": {"ENGINE": "django.db.backends.postgresql", "NAME": "app"},
        "mem": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": "file:memorydb_mem?mode=memory&cache=shared",
        },
    }
    with override_settings(DATABASES=databases):
        yield path


@pytest.fixture
async def make(db_file: Path) -> AsyncIterator[Callable[..., Any]]:
    made: list[ChannelLayer] = []

    def factory(cls: LayerClass = SQLiteChannelLayer, **config: Any) -> Any:
        config.setdefault("database", "default")
        layer = cls(**config)
        made.append(layer)
        return layer

    try:
        yield factory
    finally:
        for layer in made:
            await layer.close()


def deprecations(record: list[warnings.WarningMessage], option: str) -> list[str]:
    return [
        str(w.message)
        for w in record
        if issubclass(w.category, DeprecationWarning) and f"CONFIG[{option!r}]" in str(w.message)
    ]


def build(cls: LayerClass, **config: Any) -> tuple[Any, list[warnings.WarningMessage]]:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        layer = cls(**config)
    return layer, record


async def recv(layer: ChannelLayer, channel: str) -> dict[str, Any]:
    return await asyncio.wait_for(layer.receive(channel), GUARD)


# -- the backends themselves -------------------------------------------------------------------


@pytest.mark.parametrize("cls", BACKENDS)
def test_backend_is_a_channel_layer_and_warns_once(cls: LayerClass, db_file: Path) -> None:
    assert issubclass(cls, ChannelLayer)
    _, record = build(cls, database="default")
    messages = [str(w.message) for w in record if issubclass(w.category, DeprecationWarning)]
    assert any(cls.backend_path in m and "channels_lite.ChannelLayer" in m for m in messages)
    _, again = build(cls, database="default")
    assert not [w for w in again if issubclass(w.category, DeprecationWarning)]


@pytest.mark.parametrize("cls", BACKENDS)
async def test_backend_loads_through_channels_settings(cls: LayerClass, db_file: Path) -> None:
    from channels.layers import get_channel_layer

    backend = f"{cls.__module__}.{cls.__name__}"
    layers = {"default": {"BACKEND": backend, "CONFIG": {"database": "default"}}}
    with override_settings(CHANNEL_LAYERS=layers):
        layer = get_channel_layer()
        try:
            assert type(layer) is cls
            await layer.send("compat.check", {"type": "hello"})
            assert await recv(layer, "compat.check") == {"type": "hello"}
        finally:
            await layer.close()


def test_options_table_lists_every_04_option() -> None:
    assert set(OPTIONS_04) == {
        "database",
        "expiry",
        "group_expiry",
        "capacity",
        "channel_capacity",
        "polling_interval",
        "polling_idle_timeout",
        "auto_trim",
        "enforce_capacity",
        "serializer_format",
        "symmetric_encryption_keys",
        "pool_size",
    }


def test_deprecation_is_also_logged(db_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="channels_lite.compat"):
        build(SQLiteChannelLayer, database="default", pool_size=3)
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("CONFIG['pool_size']" in m for m in logged)
    assert any("CONFIG['database']" in m for m in logged)


# -- database ----------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", BACKENDS)
async def test_database_file_is_reused(cls: LayerClass, db_file: Path) -> None:
    layer, record = build(cls, database="default")
    other, _ = build(cls, database="default")
    try:
        assert layer.settings.driver == "sqlite"
        assert layer._primary.path == str(db_file)
        assert layer.database == "default"
        (message,) = deprecations(record, "database")
        assert "CONFIG['path']" in message
        assert "not migrated" in message
        # Two layers on the same DATABASES alias share the file: another process would too.
        await layer.send("shared", {"n": 1})
        assert await recv(other, "shared") == {"n": 1}
    finally:
        await layer.close()
        await other.close()


async def test_database_keeps_04_tables_apart(make: Callable[..., Any], db_file: Path) -> None:
    conn = sqlite3.connect(db_file)
    conn.execute(
        "CREATE TABLE channels_lite_event (id INTEGER PRIMARY KEY, channel_name TEXT, data BLOB)"
    )
    conn.execute("CREATE TABLE channels_lite_groupmembership (id INTEGER PRIMARY KEY)")
    conn.execute("INSERT INTO channels_lite_event (channel_name, data) VALUES ('old', x'00')")
    conn.commit()
    conn.close()
    layer = make(database="default")
    await layer.send("new", {"type": "x"})
    assert await recv(layer, "new") == {"type": "x"}
    await layer.flush()
    conn = sqlite3.connect(db_file)
    try:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        # 0.4's rows are neither read, migrated nor deleted, even by flush().
        assert conn.execute("SELECT count(*) FROM channels_lite_event").fetchone()[0] == 1
    finally:
        conn.close()
    assert {"channels_lite_event", "channels_lite_groupmembership"} <= tables
    assert "channels_lite_messages" in tables


def test_database_other_alias(db_file: Path) -> None:
    layer, _ = build(SQLiteChannelLayer, database="other")
    assert layer._primary.path == str(db_file.parent / "other.db")


@pytest.mark.parametrize(
    ("alias", "fragment"),
    [
        ("missing", "not in DATABASES"),
        ("pg", "need"),
        ("", "DATABASES alias"),
        (3, "DATABASES alias"),
    ],
)
def test_database_refused_naming_the_key(db_file: Path, alias: object, fragment: str) -> None:
    with pytest.raises(ConfigurationError, match=fragment) as info:
        SQLiteChannelLayer(database=alias)
    assert info.value.key == "database"


def test_database_in_memory_uses_memory_driver(db_file: Path) -> None:
    layer, _ = build(SQLiteChannelLayer, database="mem")
    assert layer.settings.driver == "memory"


def test_database_with_explicit_path(db_file: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.sqlite3"
    layer, _ = build(SQLiteChannelLayer, database="default", path=str(elsewhere))
    assert layer._primary.path == str(elsewhere)


def test_database_with_other_driver_refused(db_file: Path) -> None:
    with pytest.raises(ConfigurationError, match="remove one of them"):
        SQLiteChannelLayer(database="default", driver="redis")


def test_no_database_means_default_file(tmp_path: Path) -> None:
    # 0.4 required 'database'; without it the layer simply uses the zero-configuration file.
    with override_settings(BASE_DIR=tmp_path):
        layer, _ = build(SQLiteChannelLayer)
    assert layer._primary.path == str(tmp_path / "channels-lite.sqlite3")


# -- keys that carried over unchanged ----------------------------------------------------------


@pytest.mark.parametrize("cls", BACKENDS)
def test_carried_over_keys_are_silent(cls: LayerClass, db_file: Path) -> None:
    layer, record = build(
        cls,
        database="default",
        expiry=30,
        group_expiry=600,
        capacity=7,
        channel_capacity={"http.request": 200, "websocket.send!*": 20},
        serializer_format="json",
    )
    for option in ("expiry", "group_expiry", "capacity", "channel_capacity", "serializer_format"):
        assert not deprecations(record, option), option
    assert layer.settings.expiry == 30
    assert layer.settings.group_expiry == 600
    assert layer.settings.capacity.for_channel("anything") == 7
    assert layer.settings.capacity.for_channel("http.request") == 200
    assert layer.settings.capacity.for_channel("websocket.send!abc") == 20
    assert layer.settings.serializer_format == "json"


async def test_expiry(make: Callable[..., Any]) -> None:
    now = [1_000_000.0]
    layer = make(expiry=5, clock=lambda: now[0])
    await layer.send("c", {"n": 1})
    now[0] += 6
    await layer.send("c", {"n": 2})
    assert await recv(layer, "c") == {"n": 2}


async def test_group_expiry(make: Callable[..., Any]) -> None:
    now = [1_000_000.0]
    layer = make(group_expiry=5, clock=lambda: now[0])
    await layer.group_add("g", "member")
    assert await layer._primary.group_channels("g", now[0]) == ["member"]
    now[0] += 6
    await layer.group_send("g", {"type": "lost"})
    await layer.send("member", {"type": "direct"})
    assert await recv(layer, "member") == {"type": "direct"}


async def test_capacity(make: Callable[..., Any]) -> None:
    layer = make(capacity=2)
    await layer.send("c", {"n": 1})
    await layer.send("c", {"n": 2})
    with pytest.raises(ChannelFull):
        await layer.send("c", {"n": 3})


async def test_channel_capacity(make: Callable[..., Any]) -> None:
    layer = make(capacity=100, channel_capacity={"small*": 1})
    await layer.send("small.one", {"n": 1})
    with pytest.raises(ChannelFull):
        await layer.send("small.one", {"n": 2})
    await layer.send("big", {"n": 1})
    await layer.send("big", {"n": 2})


def test_channel_capacity_none(db_file: Path) -> None:
    layer, _ = build(SQLiteChannelLayer, database="default", channel_capacity=None)
    assert layer.settings.capacity.for_channel("x") == 100


@pytest.mark.parametrize("fmt", ["json", "msgpack"])
async def test_serializer_format(make: Callable[..., Any], fmt: str) -> None:
    layer = make(serializer_format=fmt)
    assert layer.settings.serializer_format == fmt
    await layer.send("c", {"text": "héllo", "n": [1, 2]})
    assert await recv(layer, "c") == {"text": "héllo", "n": [1, 2]}


async def test_symmetric_encryption_keys(make: Callable[..., Any], db_file: Path) -> None:
    layer = make(symmetric_encryption_keys=["a-long-secret-key-with-enough-entropy-0123"])
    await layer.send("secret", {"text": "plain-text-marker"})
    raw = sqlite3.connect(db_file)
    try:
        payloads = [row[0] for row in raw.execute("SELECT payload FROM channels_lite_messages")]
    finally:
        raw.close()
    assert payloads
    assert all(b"plain-text-marker" not in bytes(p) for p in payloads)
    assert await recv(layer, "secret") == {"text": "plain-text-marker"}


async def test_symmetric_encryption_keys_bytes_and_none(make: Callable[..., Any]) -> None:
    # 0.4 hashed str keys as UTF-8 and accepted bytes keys: both give the same key now.
    as_bytes = make(symmetric_encryption_keys=[b"shared-secret-shared-secret-0123"])
    as_text = make(symmetric_encryption_keys=["shared-secret-shared-secret-0123"])
    await as_bytes.send("enc", {"n": 1})
    assert await recv(as_text, "enc") == {"n": 1}
    plain = make(symmetric_encryption_keys=None)
    assert plain.settings.symmetric_encryption_keys == ()


def test_symmetric_encryption_keys_single_string_refused(db_file: Path) -> None:
    with pytest.raises(ConfigurationError) as info:
        SQLiteChannelLayer(database="default", symmetric_encryption_keys="one-key")
    assert info.value.key == "symmetric_encryption_keys"


# -- keys that changed or lost their meaning -----------------------------------------------


@pytest.mark.parametrize("cls", BACKENDS)
def test_polling_interval(cls: LayerClass, db_file: Path) -> None:
    layer, record = build(cls, database="default", polling_interval=0.25)
    assert layer.settings.poll_interval == 0.25
    (message,) = deprecations(record, "polling_interval")
    assert "CONFIG['poll_interval']" in message
    # One-time: a second layer does not warn again.
    _, again = build(cls, database="default", polling_interval=0.25)
    assert not deprecations(again, "polling_interval")


def test_polling_interval_yields_to_poll_interval(db_file: Path) -> None:
    layer, record = build(
        SQLiteChannelLayer, database="default", polling_interval=5, poll_interval=2
    )
    assert layer.settings.poll_interval == 2
    assert deprecations(record, "polling_interval")


@pytest.mark.parametrize("cls", BACKENDS)
def test_polling_idle_timeout(cls: LayerClass, db_file: Path) -> None:
    _, record = build(cls, database="default", polling_idle_timeout=1800)
    (message,) = deprecations(record, "polling_idle_timeout")
    assert "ignored" in message
    assert "polling_idle_timeout" not in translate_04({"polling_idle_timeout": 1}, backend="x")


@pytest.mark.parametrize("value", [True, False])
async def test_auto_trim(make: Callable[..., Any], value: bool) -> None:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        layer = make(auto_trim=value)
    (message,) = deprecations(record, "auto_trim")
    assert "CONFIG['purge_interval']" in message
    assert layer.settings.purge_interval == 30
    # Expired data still goes away, through the (0.4-compatible) manual cleanup too.
    now = [1_000_000.0]
    timed = make(auto_trim=value, expiry=1, clock=lambda: now[0])
    await timed.send("c", {"n": 1})
    now[0] += 5
    assert await timed.clean_expired() == 1


async def test_enforce_capacity_true(make: Callable[..., Any]) -> None:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        layer = make(enforce_capacity=True, capacity=1)
    assert "always enforced" in deprecations(record, "enforce_capacity")[0]
    await layer.send("c", {"n": 1})
    with pytest.raises(ChannelFull):
        await layer.send("c", {"n": 2})


async def test_enforce_capacity_false(make: Callable[..., Any]) -> None:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        layer = make(enforce_capacity=False, capacity=2, channel_capacity={"c": 1})
    (message,) = deprecations(record, "enforce_capacity")
    assert f"capacity={UNLIMITED_CAPACITY}" in message
    assert "channel_capacity is ignored" in message
    assert layer.settings.capacity.for_channel("c") == UNLIMITED_CAPACITY
    for n in range(150):
        await layer.send("c", {"n": n})


@pytest.mark.parametrize("cls", BACKENDS)
def test_pool_size(cls: LayerClass, db_file: Path) -> None:
    _, record = build(cls, database="default", pool_size=10)
    (message,) = deprecations(record, "pool_size")
    assert "ignored" in message


def test_each_obsolete_option_warns_once_per_process(db_file: Path) -> None:
    old = {
        "polling_interval": 0.1,
        "polling_idle_timeout": 60,
        "auto_trim": True,
        "enforce_capacity": True,
        "pool_size": 4,
    }
    _, first = build(AIOSQLiteChannelLayer, database="default", **old)
    _, second = build(SQLiteChannelLayer, database="default", **old)
    for option in old:
        assert len(deprecations(first, option)) == 1, option
        assert deprecations(second, option) == [], option


def test_unknown_keys_still_refused(db_file: Path) -> None:
    with pytest.raises(ConfigurationError, match="no_such_key"):
        SQLiteChannelLayer(database="default", no_such_key=1)


def test_new_keys_accepted_next_to_old_ones(db_file: Path) -> None:
    layer, _ = build(SQLiteChannelLayer, database="default", purge_interval=5, max_message_size=99)
    assert layer.settings.purge_interval == 5
    assert layer.settings.max_message_size == 99


# -- the rest of 0.4's surface -----------------------------------------------------------------


async def test_clean_expired(make: Callable[..., Any]) -> None:
    now = [1_000_000.0]
    layer = make(expiry=1, group_expiry=1, clock=lambda: now[0])
    await layer.send("c", {"n": 1})
    await layer.group_add("g", "c")
    now[0] += 5
    assert await layer.clean_expired() == 2
    assert await layer.clean_expired() == 0


def test_router_is_a_no_op() -> None:
    from channels_lite.router import ChannelsRouter

    router = ChannelsRouter()
    assert router.db_for_read(object()) is None
    assert router.db_for_write(object()) is None
    assert router.allow_relation(object(), object()) is None
    assert router.allow_migrate("default", "channels_lite") is None


def test_messages_mention_no_stale_names() -> None:
    # Every message names its replacement with the exact CONFIG spelling used in the docs.
    from channels_lite import compat

    for text in compat._MESSAGES.values():
        for name in re.findall(r"CONFIG\['(\w+)'\]", text):
            assert name in OPTIONS_04 or name in {"path", "poll_interval", "purge_interval"}
