"""Bad and unusual input, property-based (hypothesis).

- Every allowed value round-trips exactly (type for type, bit for bit, NaN and -0.0 included)
  through the real SQLite storage, for msgpack and json, with and without encryption; 1 MB and
  larger messages too.
- Every kind of invalid value, message, name and CONFIG value raises a clear error (the right
  type, naming the key or the path of the value) and stores nothing.
- Channel, group and prefix names at and around every length and character limit.

Examples are derandomized and kept to 50 per property in the normal suite; with
``CHANNELS_LITE_SOAK`` set they are random and ten times as many.
"""

from __future__ import annotations

import asyncio
import datetime
import decimal
import math
import re
import sqlite3
import sys
import types
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from rel_parent import SOAK  # noqa: E402

from channels_lite import ChannelLayer, ConfigurationError  # noqa: E402
from channels_lite.core import naming  # noqa: E402
from channels_lite.core.codec import Codec, DecodeError, make_serializer  # noqa: E402
from channels_lite.core.config import CORE_KEYS  # noqa: E402

RESERVED = "__asgi_channel__"
JSON_BYTES_TAG = "\x00bytes"
PROPS = settings(
    max_examples=500 if SOAK else 50,
    deadline=None,
    derandomize=not SOAK,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,  # one layer per test, shared by its examples
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
CONFIGS = {
    "msgpack": {"serializer_format": "msgpack"},
    "json": {"serializer_format": "json"},
    "msgpack+fernet": {"serializer_format": "msgpack", "symmetric_encryption_keys": ["k1"]},
    "json+fernet": {"serializer_format": "json", "symmetric_encryption_keys": ["k1"]},
}
GUARD = 30.0

# ----------------------------------------------------------------------------- strategies

#: Text SQLite/msgpack/json all carry: any code point but lone surrogates (tested apart).
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
KEYS = TEXT.filter(lambda k: k not in (JSON_BYTES_TAG, RESERVED))
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**300), max_value=2**300)  # far outside 64 bits
    | st.floats(allow_nan=True, allow_infinity=True)
    | TEXT
    | st.binary(max_size=300)
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.tuples(inner, inner)
        | st.dictionaries(KEYS, inner, max_size=5)
    ),
    max_leaves=40,
)
MESSAGES = st.dictionaries(KEYS, VALUES, max_size=8).filter(lambda m: RESERVED not in m)

BAD_VALUES: list[object] = [
    decimal.Decimal("1.5"),
    {1, 2},
    frozenset({"a"}),
    datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC),
    datetime.date(2024, 1, 1),
    datetime.timedelta(seconds=1),
    object(),
    1 + 2j,
    bytearray(b"x"),
    memoryview(b"x"),
    uuid.UUID(int=7),
    {1: "int key"},
    {b"k": "bytes key"},
    {None: "none key"},
    {("t",): "tuple key"},
    {1.5: "float key"},
    range(3),
    (x for x in ()),
    int,
    len,
    Ellipsis,
    NotImplemented,
    Path("/tmp"),
    types.SimpleNamespace(a=1),
]


def expected(value: Any) -> Any:
    """What a receiver gets for ``value``: tuples arrive as lists."""
    if isinstance(value, tuple | list):
        return [expected(v) for v in value]
    if isinstance(value, dict):
        return {k: expected(v) for k, v in value.items()}
    return value


def same(left: Any, right: Any) -> bool:
    """Equal, with identical types all the way down; NaN equals NaN; -0.0 is not 0.0."""
    if type(left) is not type(right):
        return False
    if isinstance(left, float):
        if math.isnan(left):
            return math.isnan(right)
        return left == right and math.copysign(1, left) == math.copysign(1, right)
    if isinstance(left, list):
        return len(left) == len(right) and all(map(same, left, right))
    if isinstance(left, dict):
        return left.keys() == right.keys() and all(same(left[k], right[k]) for k in left)
    return bool(left == right)


# ------------------------------------------------------------------------- harness


class Harness:
    """One event loop and one layer per configuration, shared by a test's examples."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.runner = asyncio.Runner()
        self.layers: dict[str, ChannelLayer] = {}
        self.serial = 0

    def layer(self, config: str, **extra: Any) -> ChannelLayer:
        name = config + repr(sorted(extra.items()))
        if name not in self.layers:
            self.layers[name] = ChannelLayer(
                driver="sqlite", path=self.path, capacity=1000, **CONFIGS[config], **extra
            )
        return self.layers[name]

    def channel(self) -> str:
        self.serial += 1
        return f"prop.{self.serial}"

    def run(self, coro: Any) -> Any:
        return self.runner.run(asyncio.wait_for(coro, GUARD))

    def stored(self) -> int:
        """Messages in storage right now (a plain read-only connection)."""
        if not self.path.exists():
            return 0
        conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
        try:
            return int(conn.execute("SELECT count(*) FROM channels_lite_messages").fetchone()[0])
        except sqlite3.OperationalError:  # no table yet: nothing was ever stored
            return 0
        finally:
            conn.close()

    def close(self) -> None:
        for layer in self.layers.values():
            self.runner.run(layer.close())
        self.runner.close()


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    h = Harness(tmp_path / "props.sqlite3")
    try:
        yield h
    finally:
        h.close()


async def round_trip(layer: ChannelLayer, channel: str, message: dict[str, Any]) -> Any:
    await layer.send(channel, message)
    return await layer.receive(channel)


# ============================================================================ round trips


@pytest.mark.parametrize("config", list(CONFIGS))
@settings(PROPS, max_examples=PROPS.max_examples * 3 // 5)  # each one a real SQLite round trip
@given(message=MESSAGES)
def test_every_allowed_value_round_trips_through_storage(
    harness: Harness, config: str, message: dict[str, Any]
) -> None:
    layer = harness.layer(config)
    got = harness.run(round_trip(layer, harness.channel(), message))
    assert same(got, expected(message)), (message, got)


@pytest.mark.parametrize("config", list(CONFIGS))
@PROPS
@given(message=MESSAGES)
def test_codec_round_trip(config: str, message: dict[str, Any]) -> None:
    """The same property without storage (cheap: in soak mode it gets the most examples)."""
    options = CONFIGS[config]
    codec = Codec(
        make_serializer(options["serializer_format"]),
        options.get("symmetric_encryption_keys", ()),
    )
    assert same(codec.decode(codec.encode(message)), expected(message))


def _big_messages() -> dict[str, dict[str, Any]]:
    blob = bytes(range(256)) * 6000  # 1.5 MB
    return {
        "bytes-1.5MB": {"type": "big", "blob": blob},
        "str-1MB-unicode": {"type": "big", "text": "\u00e9\u2603\U0001f600ab" * 150_000},
        "list-100k-ints": {"type": "big", "ints": list(range(-50_000, 50_000))},
        "many-keys": {f"k{i}": {"v": i, "b": b"x" * 8} for i in range(10_000)},
    }


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("kind", list(_big_messages()))
def test_large_messages_round_trip(harness: Harness, config: str, kind: str) -> None:
    message = _big_messages()[kind]
    layer = harness.layer(config)
    got = harness.run(round_trip(layer, harness.channel(), message))
    assert same(got, expected(message))


@PROPS
@given(text=st.text(min_size=1, max_size=20).map(lambda t: t + "\ud800"))
def test_lone_surrogates(harness: Harness, text: str) -> None:
    """A str that is not valid Unicode text: msgpack refuses it with a TypeError before
    storing anything; json (ASCII escapes) carries it exactly."""
    packed = harness.layer("msgpack")
    with pytest.raises(TypeError, match="could not be serialized"):
        harness.run(packed.send(harness.channel(), {"text": text}))
    assert harness.stored() == 0
    got = harness.run(round_trip(harness.layer("json"), harness.channel(), {"text": text}))
    assert got == {"text": text}


# ========================================================================== invalid input


def _containers(value: Any, out: list[Any]) -> list[Any]:
    if isinstance(value, dict | list):
        out.append(value)
        for item in value.values() if isinstance(value, dict) else value:
            _containers(item, out)
    return out


@st.composite
def poisoned(draw: st.DrawFn) -> tuple[dict[str, Any], object]:
    """A valid message with one invalid value put somewhere inside it."""
    message = draw(
        st.dictionaries(
            KEYS,
            st.recursive(
                SCALARS,
                lambda inner: (
                    st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4)
                ),
                max_leaves=20,
            ),
            max_size=6,
        ).filter(lambda m: RESERVED not in m)
    )
    bad = draw(st.sampled_from(BAD_VALUES))
    where = draw(st.sampled_from(_containers(message, [])))
    if isinstance(where, dict):
        where[draw(KEYS)] = bad
    else:
        where.insert(draw(st.integers(0, len(where))), bad)
    return message, bad


@pytest.mark.parametrize("config", ["msgpack", "json"])
@PROPS
@given(case=poisoned())
def test_invalid_values_refused_and_nothing_stored(
    harness: Harness, config: str, case: tuple[dict[str, Any], object]
) -> None:
    message, bad = case
    layer = harness.layer(config)
    member = harness.run(layer.new_channel())
    harness.run(layer.group_add("prop.group", "prop.member"))
    for attempt in (
        lambda: layer.send(harness.channel(), message),
        lambda: layer.send(member, message),
        lambda: layer.group_send("prop.group", message),
    ):
        with pytest.raises(TypeError) as info:
            harness.run(attempt())
        text = str(info.value)
        assert "message" in text
        # The offending value is named by type (or by its non-str key's type).
        assert type(bad).__name__ in text or any(
            type(k).__name__ in text for k in getattr(bad, "keys", list)()
        ), text
    assert harness.stored() == 0
    assert layer.local_state()["buffered_channels"] == 0


NON_DICTS: list[object] = [
    None,
    0,
    "type=x",
    b"x",
    [("type", "x")],
    (("type", "x"),),
    types.MappingProxyType({"type": "x"}),
    {"type"},
]


@pytest.mark.parametrize("config", ["msgpack", "json"])
@pytest.mark.parametrize("message", NON_DICTS, ids=lambda m: type(m).__name__)
def test_non_dict_messages_refused(harness: Harness, config: str, message: object) -> None:
    layer = harness.layer(config)
    with pytest.raises(TypeError, match="must be a dict"):
        harness.run(layer.send(harness.channel(), message))  # type: ignore[arg-type]
    assert harness.stored() == 0


@pytest.mark.parametrize("config", ["msgpack", "json"])
@PROPS
@given(message=MESSAGES)
def test_reserved_key_refused(harness: Harness, config: str, message: dict[str, Any]) -> None:
    layer = harness.layer(config)
    with pytest.raises(ValueError, match=RESERVED):
        harness.run(layer.send(harness.channel(), {**message, RESERVED: "x"}))
    assert harness.stored() == 0


@PROPS
@given(message=MESSAGES, depth=st.integers(0, 3))
def test_json_bytes_tag_refused(harness: Harness, message: dict[str, Any], depth: int) -> None:
    """The json serializer reserves one key for bytes; a message using it is refused with a
    ValueError naming where, rather than arriving as bytes."""
    inner: Any = {JSON_BYTES_TAG: "aGk="}
    for _ in range(depth):
        inner = {"nested": [inner]}
    layer = harness.layer("json")
    with pytest.raises((TypeError, ValueError), match="reserves"):
        harness.run(layer.send(harness.channel(), {**message, "x": inner}))
    assert harness.stored() == 0
    got = harness.run(round_trip(harness.layer("msgpack"), harness.channel(), {"x": inner}))
    assert got == {"x": inner}


def test_deeply_nested_message_refused_clearly(harness: Harness) -> None:
    value: Any = "leaf"
    for _ in range(5000):
        value = [value]
    with pytest.raises(TypeError, match="deep"):
        harness.run(harness.layer("msgpack").send(harness.channel(), {"v": value}))
    assert harness.stored() == 0


# ================================================================================ names

VALID_CHARS = "abcXYZ019-_."
OTHER_CHARS = "!\n\t \u00e9\x00/:@,\u0663\uff41*?[]#\\\"'"
MAX = naming.MAX_NAME_LENGTH


def channel_ok(name: str) -> bool:
    if not 1 <= len(name) <= MAX or name.count("!") > 1 or name.startswith("!"):
        return False
    return all(c in VALID_CHARS or (c.isascii() and (c.isalnum() or c in "-_.!")) for c in name)


def group_ok(name: str) -> bool:
    return 1 <= len(name) <= MAX and all(c.isascii() and (c.isalnum() or c in "-_.") for c in name)


NAME_CHARS = st.sampled_from(VALID_CHARS) | st.sampled_from(OTHER_CHARS) | st.characters()


@st.composite
def names(draw: st.DrawFn) -> str:
    """Names at and around every limit: lengths 0-3, 50 and 97-103; mostly valid characters,
    sometimes one or more others, sometimes one "!" (as process-specific names have)."""
    length = draw(st.sampled_from([0, 1, 2, 3, 50, 97, 98, 99, 100, 101, 102, 103]))
    out = list(draw(st.text(st.sampled_from(VALID_CHARS), min_size=length, max_size=length)))
    for _ in range(draw(st.sampled_from([0, 0, 1, 2]))):
        if out:
            out[draw(st.integers(0, len(out) - 1))] = draw(NAME_CHARS)
    if out and draw(st.booleans()):
        out[draw(st.integers(0, len(out) - 1))] = "!"
    return "".join(out)


@settings(PROPS, max_examples=PROPS.max_examples * 4)
@given(name=names())
def test_name_rules(name: str) -> None:
    """The checks agree with the documented rule, character for character, at every length."""
    if channel_ok(name):
        assert naming.check_channel(name) == name
    else:
        with pytest.raises(TypeError, match="Channel name"):
            naming.check_channel(name)
    if group_ok(name):
        assert naming.check_group(name) == name
    else:
        with pytest.raises(TypeError, match="Group name"):
            naming.check_group(name)


@PROPS
@given(name=names())
def test_names_through_the_layer(harness: Harness, name: str) -> None:
    """Valid names work end to end; invalid ones raise TypeError and store nothing."""
    layer = harness.layer("msgpack")
    message = {"name": name}
    if channel_ok(name):
        assert harness.run(round_trip(layer, name, message)) == message
    else:
        before = harness.stored()
        with pytest.raises(TypeError):
            harness.run(layer.send(name, message))
        with pytest.raises(TypeError):
            harness.run(layer.group_add("prop.g", name))
        assert harness.stored() == before
    if group_ok(name):
        harness.run(layer.group_add(name, "prop.gm"))
        harness.run(layer.group_send(name, message))
        assert harness.run(layer.receive("prop.gm")) == message
        harness.run(layer.group_discard(name, "prop.gm"))
    else:
        with pytest.raises(TypeError):
            harness.run(layer.group_send(name, message))
        with pytest.raises(TypeError):
            harness.run(layer.group_add(name, "prop.gm"))
        with pytest.raises(TypeError):
            harness.run(layer.group_discard(name, "prop.gm"))


@pytest.mark.parametrize("length", range(60, 72))
def test_new_channel_prefix_length_limit(harness: Harness, length: int) -> None:
    """``<prefix>.<16 hex>!<16 hex>`` must fit in 100 characters: prefixes of up to 66 work."""
    layer = harness.layer("msgpack")
    prefix = "p" * length
    if length + 34 <= MAX:
        name = harness.run(layer.new_channel(prefix))
        assert len(name) == length + 34
        assert harness.run(round_trip(layer, name, {"n": 1})) == {"n": 1}
    else:
        with pytest.raises(TypeError, match="too long"):
            harness.run(layer.new_channel(prefix))


# ================================================================================ CONFIG

ANY_VALUE = (
    st.none()
    | st.booleans()
    | st.integers(-3, 3)
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=6)
    | st.binary(max_size=3)
    | st.lists(st.text(max_size=3), max_size=2)
    | st.dictionaries(st.text(max_size=3), st.integers(-2, 3), max_size=2)
)


def _seconds_ok(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value) and value > 0
    except OverflowError:  # an int too large for a float: not a usable number of seconds
        return False


def _count_ok(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= 1


ORACLES: dict[str, Callable[[object], bool]] = {
    "expiry": _seconds_ok,
    "group_expiry": _seconds_ok,
    "purge_interval": _seconds_ok,
    "process_timeout": _seconds_ok,
    "poll_interval": lambda v: v is None or _seconds_ok(v),
    "capacity": _count_ok,
    "max_message_size": lambda v: v is None or _count_ok(v),
    "channel_capacity": lambda v: (
        isinstance(v, dict) and all(isinstance(k, str) and _count_ok(n) for k, n in v.items())
    ),
    "serializer_format": lambda v: v in ("msgpack", "json"),
    "symmetric_encryption_keys": lambda v: (
        isinstance(v, list) and all(isinstance(k, str) and k for k in v)
    ),
    "timeout": _seconds_ok,
    "synchronous": lambda v: isinstance(v, str) and v.upper() in ("NORMAL", "FULL", "OFF"),
    "table_prefix": lambda v: (
        isinstance(v, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", v) is not None
    ),
}


#: Keys taking seconds (a huge int is no number of seconds: ConfigurationError, not a crash).
_CORE_SECONDS = {"expiry", "group_expiry", "purge_interval", "process_timeout", "poll_interval"}


@pytest.mark.parametrize("key", list(ORACLES))
@settings(PROPS, max_examples=PROPS.max_examples * 2)
@given(value=ANY_VALUE | st.sampled_from([10**400, -(10**400), 2**63, 2**64 + 1]))
def test_config_values(tmp_path: Path, key: str, value: object) -> None:
    """Each CONFIG value is accepted exactly when the documented rule allows it; otherwise a
    ConfigurationError names the key. Building a layer never touches storage."""
    path = tmp_path / "config.sqlite3"
    if ORACLES[key](value):
        ChannelLayer(driver="sqlite", path=path, **{key: value})
    else:
        with pytest.raises(ConfigurationError) as info:
            ChannelLayer(driver="sqlite", path=path, **{key: value})
        assert info.value.key is not None
        assert info.value.key.startswith(key)
        assert key in str(info.value)
    assert not path.exists()


@pytest.mark.parametrize("key", sorted(_CORE_SECONDS))
def test_huge_int_seconds_refused_clearly(tmp_path: Path, key: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        ChannelLayer(driver="sqlite", path=tmp_path / "c.sqlite3", **{key: 10**400})
    assert info.value.key == key


@PROPS
@given(key=st.from_regex(r"[a-z_]{1,12}", fullmatch=True), value=ANY_VALUE)
def test_unknown_config_key_named(tmp_path: Path, key: str, value: object) -> None:
    assume(key not in CORE_KEYS and key not in ORACLES and key != "path")
    path = tmp_path / "config.sqlite3"
    with pytest.raises(ConfigurationError) as info:
        ChannelLayer(driver="sqlite", path=path, **{key: value})
    assert info.value.key == key
    assert repr(key) in str(info.value)
    assert not path.exists()


# ============================================================================ encryption

KEY_STRINGS = st.text(min_size=1, max_size=30)


@PROPS
@given(
    message=MESSAGES,
    keys=st.lists(KEY_STRINGS, min_size=1, max_size=3, unique=True),
    other=KEY_STRINGS,
    serializer=st.sampled_from(["msgpack", "json"]),
)
def test_encryption_keys(
    message: dict[str, Any], keys: list[str], other: str, serializer: str
) -> None:
    """The first key encrypts; a reader holding it anywhere in its list decrypts exactly; a
    reader without it refuses the message (DecodeError, nothing returned); tampering with any
    byte is detected."""
    assume(other not in keys)
    writer = Codec(make_serializer(serializer), keys)
    token = writer.encode(message)
    for reader_keys in ([keys[0]], [other, keys[0]], [*keys[1:], keys[0]]):
        reader = Codec(make_serializer(serializer), reader_keys)
        assert same(reader.decode(token), expected(message))
    with pytest.raises(DecodeError):
        Codec(make_serializer(serializer), [other, *keys[1:]]).decode(token)
    with pytest.raises(DecodeError):
        Codec(make_serializer(serializer)).decode(token)  # no keys: not a plain payload
    for position in (0, len(token) // 2, len(token) - 1):
        tampered = bytearray(token)
        tampered[position] ^= 0x01
        with pytest.raises(DecodeError):
            writer.decode(bytes(tampered))
