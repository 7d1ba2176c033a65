"""Tier 2: the Channels behaviour of SPEC.md, through the public layer API with one driver.

Every test names the SPEC item(s) it covers. Time is controlled with the layer's ``clock``
option (:class:`~channels_lite.conformance.clock.ManualClock`), never with sleeps; absence of a
message is proven with a sentinel sent afterwards (FIFO makes it arrive first only if nothing
was queued before it) or, where that is impossible, a short ``wait_for`` of ``ABSENT`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import decimal
import logging
import random
import re
import time
import types
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from channels.exceptions import ChannelFull, InvalidChannelLayerError, MessageTooLarge

from channels_lite import ChannelLayer, ConfigurationError
from channels_lite.core import naming
from channels_lite.drivers.base import Driver, SupportsLiveness

from ._support import (
    ABSENT,
    GUARD,
    ConformanceFixtures,
    ConstructionError,
    claim,
    run_in_new_loop,
)
from .clock import ManualClock

__all__ = ["LayerTests"]

MakeLayer = Callable[..., ChannelLayer]

# ----------------------------------------------------------------------------- helpers


async def recv(layer: ChannelLayer, channel: str) -> dict[str, Any]:
    """Receive, with a hang guard that a passing test never reaches."""
    return await asyncio.wait_for(layer.receive(channel), GUARD)


async def assert_next_is_sentinel(
    layer: ChannelLayer, channel: str, sender: ChannelLayer | None = None
) -> None:
    """Send a fresh sentinel; it must be the next message: nothing else was queued."""
    marker = {"type": "conformance.sentinel", "id": uuid.uuid4().hex}
    await (sender or layer).send(channel, marker)
    got = await recv(layer, channel)
    assert got == marker, f"expected nothing queued on {channel!r} before the sentinel, got {got!r}"


async def assert_nothing(layer: ChannelLayer, channel: str) -> None:
    """Nothing arrives within ``ABSENT`` seconds (only where a sentinel cannot be used)."""
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(layer.receive(channel), ABSENT)


async def fill(layer: ChannelLayer, channel: str, most: int = 1000) -> int:
    """Send until ``ChannelFull``; return how many were accepted."""
    for count in range(most + 1):
        try:
            await layer.send(channel, {"type": "fill", "n": count})
        except ChannelFull:
            return count
    raise AssertionError(f"{channel!r} accepted more than {most} messages")


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll ``check`` until true: only for background work that has no event to wait on."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + GUARD
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        await asyncio.sleep(0.01)


def strictly_equal(left: object, right: object) -> bool:
    """Equal values of identical types all the way down (``True`` is not ``1``)."""
    if type(left) is not type(right):
        return False
    if isinstance(left, dict):
        assert isinstance(right, dict)
        return left.keys() == right.keys() and all(strictly_equal(left[k], right[k]) for k in left)
    if isinstance(left, list):
        assert isinstance(right, list)
        return len(left) == len(right) and all(
            strictly_equal(a, b) for a, b in zip(left, right, strict=True)
        )
    return left == right


async def _receive_n(layer: ChannelLayer, channel: str, count: int) -> list[dict[str, Any]]:
    return [await recv(layer, channel) for _ in range(count)]


async def _send_all(layer: ChannelLayer, channel: str, messages: list[dict[str, Any]]) -> None:
    for message in messages:
        await layer.send(channel, message)


@contextlib.asynccontextmanager
async def _layer_with_default_expiries(
    driver_options: dict[str, Any], **overrides: Any
) -> AsyncIterator[ChannelLayer]:
    """A layer whose CONFIG has neither ``expiry`` nor ``group_expiry`` (even if
    ``driver_options`` sets them), closed after the block."""
    options = {k: v for k, v in driver_options.items() if k not in {"expiry", "group_expiry"}}
    layer = ChannelLayer(**options, **overrides)
    try:
        yield layer
    finally:
        await layer.close()


# ------------------------------------------------------------------------- name tables

VALID_CHANNELS = [
    "a",
    "chat",
    "Chat-Room_1.x",
    "0",
    "-",
    "_",
    ".",
    "a" * 100,
    "x" * 99 + "9",
]
VALID_PROCESS_SPECIFIC = [
    "x.y!z",
    "remote!local",
    "remote!",
    "specific.abc!" + "d" * 87,  # exactly 100 characters
]
INVALID_CHANNELS: list[object] = [
    "",
    "a" * 101,
    "abc\n",
    "\nabc",
    "a b",
    "a\tb",
    "caf\u00e9",
    "a!b!c",
    "!abc",
    "a/b",
    "a:b",
    "a@b",
    "a,b",
    "\u0663",  # ARABIC-INDIC DIGIT THREE: \d matches it, the rule is ASCII only
    "\uff41bc",  # fullwidth letter
    "a\x00b",
    "specific.abc!" + "d" * 88,  # 101 characters
    b"abc",
    42,
    None,
    ("a",),
]
VALID_GROUPS = ["g", "g" * 100, "Group-1_x.y", "0", "room.42"]
INVALID_GROUPS: list[object] = [
    "",
    "g" * 101,
    "g!",
    "g!x",
    "!g",
    "abc\n",
    "a b",
    "caf\u00e9",
    "\u0663",
    "a:b",
    b"g",
    7,
    None,
]


#: How a process-specific channel is written: by its own process (which may deliver in
#: process) or by another one (through storage and the claim loop).
VIAS = ["same-process", "other-process"]
#: Channel kinds for receive tests: a normal channel, or a process-specific one written by
#: the same or another process.
KINDS = ["normal", "specific-same-process", "specific-other-process"]


def _name_id(value: object) -> str:
    text = repr(value)
    return text if len(text) < 30 else f"{text[:12]}...len{len(text) - 2}"


ROUND_TRIP_VALUES: dict[str, object] = {
    "bytes": b"\x00\xff binary \x80",
    "empty-bytes": b"",
    "str": "h\u00e9llo \u2713 \U0001f600",
    "empty-str": "",
    "int": 42,
    "negative-int": -7,
    "zero": 0,
    "int64-max": 2**63 - 1,
    "int64-min": -(2**63),
    "float": 3.25,
    "float-tiny": -1.5e-300,
    "float-integral": 2.0,
    "true": True,
    "false": False,
    "none": None,
    "list": [1, "a", b"b", None, 2.5, True],
    "empty-list": [],
    "empty-dict": {},
    "nested": {"a": {"b": [{"c": b"d", "e": [1, [2, [3]]]}]}},
    "unicode-keys": {"cl\u00e9": 1, "\u2603": {"\u00fc": "x"}},
}

BAD_VALUES: dict[str, object] = {
    "decimal": decimal.Decimal("1.5"),
    "set": {1, 2},
    "frozenset": frozenset({1}),
    "datetime": datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC),
    "date": datetime.date(2024, 1, 1),
    "object": object(),
    "complex": 1 + 2j,
    "uuid": uuid.UUID(int=1),
    "int-key-dict": {1: "a"},
    "bytes-key-dict": {b"k": "a"},
    "none-key-dict": {None: "a"},
    "tuple-key-dict": {("a",): 1},
    "type": int,
    "function": len,
}

NON_DICT_MESSAGES: dict[str, object] = {
    "list": [("type", "x")],
    "str": "type=x",
    "bytes": b"x",
    "none": None,
    "int": 1,
    "mappingproxy": types.MappingProxyType({"type": "x"}),
}

BAD_CONFIG: list[tuple[str, object]] = [
    ("capacity", "10"),
    ("capacity", 1.5),
    ("capacity", True),
    ("capacity", None),
    ("capacity", 0),
    ("capacity", -1),
    ("expiry", "60"),
    ("expiry", None),
    ("expiry", 0),
    ("expiry", -1),
    ("expiry", float("nan")),
    ("expiry", float("inf")),
    ("group_expiry", "x"),
    ("group_expiry", 0),
    ("group_expiry", -86400),
    ("channel_capacity", [("a", 1)]),
    ("channel_capacity", "a*"),
    ("channel_capacity", {5: 1}),
    ("channel_capacity", {"a*": "1"}),
    ("channel_capacity", {"a*": 0}),
    ("channel_capacity", {"a*": -3}),
    ("channel_capacity", {re.compile("a"): 1.5}),
    ("serializer_format", "xml"),
    ("serializer_format", 5),
    ("symmetric_encryption_keys", "secret"),
    ("symmetric_encryption_keys", b"secret"),
    ("symmetric_encryption_keys", [b"secret"]),
    ("symmetric_encryption_keys", [""]),
    ("symmetric_encryption_keys", 5),
    ("max_message_size", "big"),
    ("max_message_size", 0),
    ("max_message_size", -1),
    ("max_message_size", 1.5),
    ("poll_interval", "fast"),
    ("poll_interval", -1),
    ("purge_interval", 0),
    ("purge_interval", "often"),
    ("process_timeout", -5),
    ("process_timeout", 0),
    ("consumer_grace", -1),
    ("consumer_grace", "5s"),
    ("clock", 5),
    ("clock", "time.time"),
    ("driver", 5),
    ("driver", ""),
]


class LayerTests(ConformanceFixtures):
    """SPEC.md through ``ChannelLayer`` with the driver from ``driver_options``."""

    # ================================================================= names (SPEC 1, 2)

    @pytest.mark.parametrize("name", VALID_CHANNELS, ids=_name_id)
    @pytest.mark.asyncio
    async def test_valid_channel_name_round_trip(self, layer: ChannelLayer, name: str) -> None:
        """SPEC 1, 2: ASCII letters, digits, ``-_.``, up to 100 characters, are accepted."""
        await layer.send(name, {"type": "t", "name": name})
        assert await recv(layer, name) == {"type": "t", "name": name}

    @pytest.mark.parametrize("name", VALID_PROCESS_SPECIFIC, ids=_name_id)
    @pytest.mark.asyncio
    async def test_valid_process_specific_names_accepted(
        self, layer: ChannelLayer, name: str
    ) -> None:
        """SPEC 1: a channel name may hold one ``!`` (``remote!local``)."""
        assert len(name) <= 100
        await layer.send(name, {"type": "t"})
        await layer.group_add("g", name)
        await layer.group_discard("g", name)

    @pytest.mark.parametrize("name", INVALID_CHANNELS, ids=_name_id)
    @pytest.mark.asyncio
    async def test_invalid_channel_refused(self, layer: ChannelLayer, name: Any) -> None:
        """SPEC 1, 2: invalid channel names raise TypeError in every call that takes one."""
        with pytest.raises(TypeError):
            await layer.send(name, {"type": "t"})
        with pytest.raises(TypeError):
            await asyncio.wait_for(layer.receive(name), GUARD)
        with pytest.raises(TypeError):
            await layer.group_add("g", name)
        with pytest.raises(TypeError):
            await layer.group_discard("g", name)

    @pytest.mark.parametrize("name", VALID_GROUPS, ids=_name_id)
    @pytest.mark.asyncio
    async def test_valid_group_name(self, layer: ChannelLayer, name: str) -> None:
        """SPEC 1, 2: valid group names work in group_add/group_send/group_discard."""
        await layer.group_add(name, "member")
        await layer.group_send(name, {"type": "g"})
        assert await recv(layer, "member") == {"type": "g"}
        await layer.group_discard(name, "member")

    @pytest.mark.parametrize("name", INVALID_GROUPS, ids=_name_id)
    @pytest.mark.asyncio
    async def test_invalid_group_refused(self, layer: ChannelLayer, name: Any) -> None:
        """SPEC 1, 2: groups never hold ``!``; invalid group names raise TypeError."""
        with pytest.raises(TypeError):
            await layer.group_add(name, "member")
        with pytest.raises(TypeError):
            await layer.group_discard(name, "member")
        with pytest.raises(TypeError):
            await layer.group_send(name, {"type": "g"})

    @pytest.mark.asyncio
    async def test_name_length_rule_both_sides(self, layer: ChannelLayer) -> None:
        """SPEC 2: 100 characters accepted, 101 refused, for channels and groups."""
        await layer.send("c" * 100, {"n": 100})
        assert await recv(layer, "c" * 100) == {"n": 100}
        with pytest.raises(TypeError):
            await layer.send("c" * 101, {"n": 101})
        await layer.group_add("g" * 100, "c" * 100)
        with pytest.raises(TypeError):
            await layer.group_add("g" * 101, "c" * 100)

    @pytest.mark.asyncio
    async def test_trailing_newline_refused(self, layer: ChannelLayer) -> None:
        """SPEC 2: Channels' base regex lets ``"abc\\n"`` through; this layer must not."""
        for call in (
            layer.send("abc\n", {}),
            layer.group_add("abc\n", "x"),
            layer.group_add("g", "abc\n"),
            layer.group_send("abc\n", {}),
        ):
            with pytest.raises(TypeError):
                await call

    # ============================================================== new_channel (SPEC 3)

    @pytest.mark.asyncio
    async def test_new_channel_format(self, layer: ChannelLayer) -> None:
        """SPEC 3: ``new_channel()`` is ``specific.<client>!<unique>``; prefix is honoured."""
        default = await layer.new_channel()
        assert re.fullmatch(r"specific\.[A-Za-z0-9_.\-]+![A-Za-z0-9_.\-]+", default), default
        custom = await layer.new_channel(prefix="my-prefix_1.x")
        assert custom.startswith("my-prefix_1.x.")
        assert custom.count("!") == 1
        assert len(default) <= 100
        assert len(custom) <= 100
        # One client id per layer instance: the part before "!" is shared.
        again = await layer.new_channel()
        assert again.split("!")[0] == default.split("!")[0]

    @pytest.mark.asyncio
    async def test_new_channel_unique_after_random_seed(self, layer: ChannelLayer) -> None:
        """SPEC 3: names stay unique even when ``random.seed()`` is reset between calls."""
        state = random.getstate()
        try:
            names = set()
            for _ in range(20):
                random.seed(1234)
                names.add(await layer.new_channel())
        finally:
            random.setstate(state)
        assert len(names) == 20

    @pytest.mark.asyncio
    async def test_new_channel_many_unique(self, layer: ChannelLayer) -> None:
        """SPEC 3: a thousand names, no repeats."""
        names = [await layer.new_channel() for _ in range(1000)]
        assert len(set(names)) == 1000

    @pytest.mark.asyncio
    async def test_new_channel_distinct_clients(
        self, layer: ChannelLayer, second_layer: ChannelLayer
    ) -> None:
        """SPEC 3, 10: two layer instances (two processes) never share a client id."""
        first = await layer.new_channel()
        second = await second_layer.new_channel()
        assert first.split("!")[0] != second.split("!")[0]

    @pytest.mark.parametrize("prefix", ["", "a!b", "with space", "caf\u00e9", "x\n"], ids=repr)
    @pytest.mark.asyncio
    async def test_new_channel_invalid_prefix(self, layer: ChannelLayer, prefix: str) -> None:
        """SPEC 2, 3: an invalid prefix raises TypeError."""
        with pytest.raises(TypeError):
            await layer.new_channel(prefix=prefix)

    @pytest.mark.asyncio
    async def test_new_channel_prefix_length_limit(self, layer: ChannelLayer) -> None:
        """SPEC 2, 3: the longest prefix giving a 100-character name works; one more fails."""
        overhead = len(await layer.new_channel(prefix="p")) - 1
        longest = "p" * (100 - overhead)
        channel = await layer.new_channel(prefix=longest)
        assert len(channel) == 100
        await layer.send(channel, {"type": "long"})
        assert await recv(layer, channel) == {"type": "long"}
        with pytest.raises(TypeError):
            await layer.new_channel(prefix=longest + "p")

    # ====================================================== process-specific receive (SPEC 4)

    @pytest.mark.asyncio
    async def test_receive_full_process_specific_name(self, layer: ChannelLayer) -> None:
        """SPEC 4: ``receive(<full name from new_channel>)`` gets that channel's messages."""
        channel = await layer.new_channel()
        await layer.send(channel, {"type": "hello"})
        assert await recv(layer, channel) == {"type": "hello"}

    @pytest.mark.parametrize("via", VIAS)
    @pytest.mark.asyncio
    async def test_process_specific_channels_kept_apart(
        self, layer: ChannelLayer, second_layer: ChannelLayer, via: str
    ) -> None:
        """SPEC 4, 13: channels of one process get only their own messages, in any read
        order (written by the same process or through storage by another)."""
        sender = layer if via == "same-process" else second_layer
        channels = [await layer.new_channel() for _ in range(4)]
        for round_ in range(3):
            for index, channel in enumerate(channels):
                await sender.send(channel, {"c": index, "r": round_})
        for index in reversed(range(4)):
            got = await _receive_n(layer, channels[index], 3)
            assert got == [{"c": index, "r": r} for r in range(3)]

    @pytest.mark.asyncio
    async def test_process_specific_from_another_instance(
        self, layer: ChannelLayer, second_layer: ChannelLayer
    ) -> None:
        """SPEC 4, 10: another process sends to this process's channel."""
        channel = await layer.new_channel()
        waiting = asyncio.create_task(layer.receive(channel))
        await second_layer.send(channel, {"type": "remote"})
        assert await asyncio.wait_for(waiting, GUARD) == {"type": "remote"}
        other = await second_layer.new_channel()
        await layer.send(other, {"type": "back"})
        assert await recv(second_layer, other) == {"type": "back"}

    @pytest.mark.asyncio
    async def test_other_instance_cannot_steal_specific_messages(
        self, layer: ChannelLayer, second_layer: ChannelLayer
    ) -> None:
        """SPEC 4, 10: a process's channels are read by that process only; another process
        reading its own channels never takes them."""
        mine = await layer.new_channel()
        theirs = await second_layer.new_channel()
        waiting = asyncio.create_task(second_layer.receive(theirs))
        for n in range(5):
            await second_layer.send(mine, {"n": n})
        await layer.send(theirs, {"n": "theirs"})
        assert await asyncio.wait_for(waiting, GUARD) == {"n": "theirs"}
        assert await _receive_n(layer, mine, 5) == [{"n": n} for n in range(5)]

    # ============================================================== messages (SPEC 5, 7)

    @pytest.mark.parametrize("serializer", ["msgpack", "json"])
    @pytest.mark.parametrize("kind", list(ROUND_TRIP_VALUES))
    @pytest.mark.asyncio
    async def test_value_round_trip(
        self, make_layer: MakeLayer, serializer: str, kind: str
    ) -> None:
        """SPEC 5: every allowed value type round-trips exactly, type included."""
        layer = make_layer(serializer_format=serializer)
        value = ROUND_TRIP_VALUES[kind]
        await layer.send("values", {"type": "v", "value": value})
        got = await recv(layer, "values")
        assert strictly_equal(got, {"type": "v", "value": value}), (got, value)

    @pytest.mark.parametrize("serializer", ["msgpack", "json"])
    @pytest.mark.asyncio
    async def test_tuples_arrive_as_lists(self, make_layer: MakeLayer, serializer: str) -> None:
        """SPEC 5: tuples are carried (as lists, as every Channels layer does)."""
        layer = make_layer(serializer_format=serializer)
        await layer.send("t", {"t": (1, "a", (2, (b"x",)))})
        assert await recv(layer, "t") == {"t": [1, "a", [2, [b"x"]]]}

    @pytest.mark.parametrize("serializer", ["msgpack", "json"])
    @pytest.mark.asyncio
    async def test_asgi_websocket_message(self, make_layer: MakeLayer, serializer: str) -> None:
        """SPEC 5: a realistic ASGI event (``text`` and ``bytes`` keys) comes back as sent."""
        layer = make_layer(serializer_format=serializer)
        message = {"type": "websocket.send", "text": None, "bytes": b"\x00\x01\x02"}
        await layer.send("ws", message)
        assert strictly_equal(await recv(layer, "ws"), message)

    @pytest.mark.parametrize("serializer", ["msgpack", "json"])
    @pytest.mark.asyncio
    async def test_lookalike_internal_keys_survive(
        self, make_layer: MakeLayer, serializer: str
    ) -> None:
        """SPEC 5, 7: a message whose dict looks like a serializer's own tagging (e.g. a
        ``"\\x00bytes"`` key) either round-trips exactly or is refused at send; it is never
        silently changed."""
        layer = make_layer(serializer_format=serializer)
        tricky = {"x": {"\x00bytes": "aGk="}, "__bytes__": "aGk=", "y": {"$b": "aGk="}}
        try:
            await layer.send("tricky", tricky)
        except (TypeError, ValueError):
            return
        got = await recv(layer, "tricky")
        assert strictly_equal(got, tricky), f"sent {tricky!r}, received {got!r}"

    @pytest.mark.parametrize("kind", list(NON_DICT_MESSAGES))
    @pytest.mark.asyncio
    async def test_non_dict_message_refused(self, layer: ChannelLayer, kind: str) -> None:
        """SPEC 5: a non-dict message raises TypeError (a real check, not an ``assert``)."""
        message: Any = NON_DICT_MESSAGES[kind]
        with pytest.raises(TypeError):
            await layer.send("c", message)
        await layer.group_add("g", "c")
        with pytest.raises(TypeError):
            await layer.group_send("g", message)
        await assert_next_is_sentinel(layer, "c")

    @pytest.mark.asyncio
    async def test_reserved_key_refused(self, layer: ChannelLayer) -> None:
        """SPEC 5: a message holding ``__asgi_channel__`` raises ValueError, stores nothing."""
        with pytest.raises(ValueError, match="__asgi_channel__"):
            await layer.send("c", {"type": "x", "__asgi_channel__": "c"})
        await layer.group_add("g", "c")
        with pytest.raises(ValueError, match="__asgi_channel__"):
            await layer.group_send("g", {"__asgi_channel__": "c"})
        await assert_next_is_sentinel(layer, "c")

    @pytest.mark.parametrize("serializer", ["msgpack", "json"])
    @pytest.mark.parametrize("kind", list(BAD_VALUES))
    @pytest.mark.asyncio
    async def test_unserializable_value_refused_naming_path(
        self, make_layer: MakeLayer, serializer: str, kind: str
    ) -> None:
        """SPEC 5: a value the serializer cannot carry is refused at send with TypeError
        naming where it is, and nothing is stored."""
        layer = make_layer(serializer_format=serializer)
        message = {"type": "x", "outer": {"offending_key": [1, BAD_VALUES[kind]]}}
        with pytest.raises(TypeError) as info:
            await layer.send("c", message)
        assert "offending_key" in str(info.value), str(info.value)
        await layer.group_add("g", "c")
        with pytest.raises(TypeError):
            await layer.group_send("g", message)
        await assert_next_is_sentinel(layer, "c")

    @pytest.mark.asyncio
    async def test_receiver_never_shares_objects(self, layer: ChannelLayer) -> None:
        """SPEC 7: mutating the sent message after send changes nothing for the receiver."""
        nested = {"k": [1, 2]}
        sent: dict[str, Any] = {"type": "copy", "list": [1, [2, 3]], "dict": nested}
        await layer.send("c", sent)
        sent["list"][1].append(4)
        nested["k"].append(3)
        sent["added"] = True
        got = await recv(layer, "c")
        assert got == {"type": "copy", "list": [1, [2, 3]], "dict": {"k": [1, 2]}}
        assert got is not sent
        assert got["dict"] is not nested

    @pytest.mark.asyncio
    async def test_group_receivers_get_independent_copies(self, layer: ChannelLayer) -> None:
        """SPEC 7: two members of one group_send never share objects."""
        await layer.group_add("g", "one")
        await layer.group_add("g", "two")
        sent = {"type": "copy", "list": [[1]]}
        await layer.group_send("g", sent)
        first = await recv(layer, "one")
        first["list"][0].append(2)
        second = await recv(layer, "two")
        assert second == {"type": "copy", "list": [[1]]}
        assert first["list"] is not second["list"]
        assert sent == {"type": "copy", "list": [[1]]}

    # ======================================================== large messages (SPEC 6)

    @pytest.mark.parametrize("serializer", ["msgpack", "json"])
    @pytest.mark.asyncio
    async def test_one_megabyte_messages(self, make_layer: MakeLayer, serializer: str) -> None:
        """SPEC 6: messages of at least 1 MB round-trip (bytes and text)."""
        layer = make_layer(serializer_format=serializer)
        blob = random.Random(6).randbytes(1_200_000)
        text = "\u00e9x" * 600_000
        await layer.send("big", {"bytes": blob, "text": text})
        got = await recv(layer, "big")
        assert got["bytes"] == blob
        assert got["text"] == text

    @pytest.mark.asyncio
    async def test_one_megabyte_group_send_and_specific(self, layer: ChannelLayer) -> None:
        """SPEC 6: large messages through group_send and process-specific channels."""
        blob = random.Random(7).randbytes(1_100_000)
        channel = await layer.new_channel()
        await layer.group_add("big", channel)
        await layer.group_add("big", "plain")
        await layer.group_send("big", {"blob": blob})
        assert (await recv(layer, channel))["blob"] == blob
        assert (await recv(layer, "plain"))["blob"] == blob

    @pytest.mark.asyncio
    async def test_max_message_size(self, make_layer: MakeLayer) -> None:
        """SPEC 6, 8, 9: over ``max_message_size`` raises ``layer.MessageTooLarge`` (the
        Channels exception) and stores nothing."""
        layer = make_layer(max_message_size=10_000)
        await layer.send("c", {"b": b"x" * 100})
        assert await recv(layer, "c") == {"b": b"x" * 100}
        with pytest.raises(MessageTooLarge):
            await layer.send("c", {"b": b"x" * 20_000})
        with pytest.raises(layer.MessageTooLarge):
            await layer.send("c", {"b": b"x" * 20_000})
        await assert_next_is_sentinel(layer, "c")

    @pytest.mark.asyncio
    async def test_max_message_size_group_send(self, make_layer: MakeLayer) -> None:
        """SPEC 6, 16: a too-large group message raises MessageTooLarge or reaches nobody;
        it is never delivered cut short."""
        layer = make_layer(max_message_size=10_000)
        await layer.group_add("g", "member")
        with contextlib.suppress(MessageTooLarge):
            await layer.group_send("g", {"b": b"x" * 20_000})
        await assert_next_is_sentinel(layer, "member")

    # ================================================================ attributes (SPEC 8)

    def test_extensions_and_exception_attributes(self, driver_options: dict[str, Any]) -> None:
        """SPEC 8: ``extensions``, ``ChannelFull`` and ``MessageTooLarge`` on the class and
        on instances; they are Channels' own exceptions."""
        layer = ChannelLayer(**driver_options)
        assert layer.extensions == ["groups", "flush"]
        assert ChannelLayer.extensions == ["groups", "flush"]
        for owner in (layer, ChannelLayer):
            assert issubclass(owner.ChannelFull, ChannelFull)
            assert issubclass(owner.MessageTooLarge, MessageTooLarge)

    # ========================================================= never blocking (SPEC 9)

    @pytest.mark.asyncio
    async def test_send_to_full_channel_raises_at_once(self, make_layer: MakeLayer) -> None:
        """SPEC 9: ``send`` never waits for space; it raises ``ChannelFull``."""
        layer = make_layer(capacity=2)
        await layer.send("c", {"n": 1})
        await layer.send("c", {"n": 2})
        with pytest.raises(ChannelFull):
            await asyncio.wait_for(layer.send("c", {"n": 3}), GUARD)
        with pytest.raises(layer.ChannelFull):
            await asyncio.wait_for(layer.send("c", {"n": 4}), GUARD)
        assert await _receive_n(layer, "c", 2) == [{"n": 1}, {"n": 2}]
        await assert_next_is_sentinel(layer, "c")

    # ===================================================== exactly once (SPEC 10, 23)

    @pytest.mark.asyncio
    async def test_many_readers_each_message_once(self, make_layer: MakeLayer) -> None:
        """SPEC 10, 23: readers in two instances and in a thread's own event loop share a
        normal channel; every message is delivered exactly once."""
        first = make_layer(capacity=2000)
        second = make_layer(capacity=2000)
        total = 300
        channel = "work"

        async def reader(layer: ChannelLayer) -> list[int]:
            got: list[int] = []
            while True:
                message = await asyncio.wait_for(layer.receive(channel), GUARD)
                if message.get("stop"):
                    return got
                got.append(message["n"])

        readers: list[asyncio.Future[list[int]]] = [
            asyncio.ensure_future(reader(first)),
            asyncio.ensure_future(reader(first)),
            asyncio.ensure_future(reader(second)),
            asyncio.ensure_future(reader(second)),
            asyncio.ensure_future(asyncio.to_thread(run_in_new_loop, reader, first)),
        ]
        for n in range(total):
            await (first if n % 2 else second).send(channel, {"n": n})
        for _ in readers:
            await first.send(channel, {"stop": True})
        results = await asyncio.wait_for(asyncio.gather(*readers), GUARD * 3)
        everything = [n for result in results for n in result]
        duplicates = [n for n in set(everything) if everything.count(n) > 1]
        assert duplicates == [], f"delivered twice: {sorted(duplicates)[:20]}"
        assert sorted(everything) == list(range(total))

    @pytest.mark.asyncio
    async def test_competing_receivers_each_message_once(
        self, layer: ChannelLayer, second_layer: ChannelLayer
    ) -> None:
        """SPEC 10: messages sent before the readers start are also each delivered once."""
        for n in range(60):
            await layer.send("queue", {"n": n})
        results = await asyncio.gather(
            *(_receive_n(lay, "queue", 15) for lay in (layer, second_layer, layer, second_layer))
        )
        got = [m["n"] for result in results for m in result]
        assert sorted(got) == list(range(60))
        await assert_next_is_sentinel(layer, "queue")

    # ================================================================== FIFO (SPEC 11)

    @pytest.mark.asyncio
    async def test_fifo_normal_channel(self, layer: ChannelLayer) -> None:
        """SPEC 11: one writer, one reader: perfect order."""
        await _send_all(layer, "fifo", [{"n": n} for n in range(80)])
        assert await _receive_n(layer, "fifo", 80) == [{"n": n} for n in range(80)]

    @pytest.mark.parametrize("via", VIAS)
    @pytest.mark.asyncio
    async def test_fifo_process_specific_channel(
        self, layer: ChannelLayer, second_layer: ChannelLayer, via: str
    ) -> None:
        """SPEC 11: order holds on process-specific channels, interleaved with others."""
        sender = layer if via == "same-process" else second_layer
        first, second = await layer.new_channel(), await layer.new_channel()
        for n in range(60):
            await sender.send(first if n % 3 else second, {"n": n})
        expected_first = [{"n": n} for n in range(60) if n % 3]
        expected_second = [{"n": n} for n in range(60) if not n % 3]
        assert await _receive_n(layer, second, len(expected_second)) == expected_second
        assert await _receive_n(layer, first, len(expected_first)) == expected_first

    @pytest.mark.asyncio
    async def test_fifo_across_instances_while_receiving(
        self, layer: ChannelLayer, second_layer: ChannelLayer
    ) -> None:
        """SPEC 11: a writer in another process, a reader receiving concurrently."""
        channel = await layer.new_channel()
        reading = asyncio.create_task(_receive_n(layer, channel, 50))
        await _send_all(second_layer, channel, [{"n": n} for n in range(50)])
        assert await asyncio.wait_for(reading, GUARD) == [{"n": n} for n in range(50)]

    @pytest.mark.asyncio
    async def test_fifo_group_send(self, layer: ChannelLayer) -> None:
        """SPEC 11, 21: successive group messages reach a member in order."""
        channel = await layer.new_channel()
        await layer.group_add("g", channel)
        await layer.group_add("g", "plain")
        for n in range(30):
            await layer.group_send("g", {"n": n})
        assert await _receive_n(layer, channel, 30) == [{"n": n} for n in range(30)]
        assert await _receive_n(layer, "plain", 30) == [{"n": n} for n in range(30)]

    @pytest.mark.asyncio
    async def test_fifo_writer_in_other_event_loop(self, layer: ChannelLayer) -> None:
        """SPEC 11, 23: a sync caller (async_to_sync, new loop) writing, main loop reading."""
        channel = await layer.new_channel()
        messages = [{"n": n} for n in range(40)]
        await asyncio.to_thread(run_in_new_loop, _send_all, layer, channel, messages)
        assert await _receive_n(layer, channel, 40) == messages

    # ========================================================== cancellation (SPEC 12)

    async def _route(
        self, layer: ChannelLayer, second_layer: ChannelLayer, kind: str
    ) -> tuple[str, ChannelLayer]:
        """A channel ``layer`` reads, and the layer that writes to it (see ``KINDS``)."""
        if kind == "normal":
            return f"plain-{uuid.uuid4().hex}", layer
        channel = await layer.new_channel()
        return channel, (layer if kind == "specific-same-process" else second_layer)

    @pytest.mark.parametrize("kind", KINDS)
    @pytest.mark.asyncio
    async def test_cancel_idle_receive(
        self, layer: ChannelLayer, second_layer: ChannelLayer, kind: str
    ) -> None:
        """SPEC 12: cancelling a waiting receive ends it at once and wedges nothing."""
        channel, sender = await self._route(layer, second_layer, kind)
        for _ in range(3):
            task = asyncio.create_task(layer.receive(channel))
            await asyncio.sleep(0)
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=GUARD)
            assert task in done, "a cancelled receive() did not finish"
            assert task.cancelled()
        await sender.send(channel, {"type": "after"})
        assert await recv(layer, channel) == {"type": "after"}

    @pytest.mark.parametrize("kind", KINDS)
    @pytest.mark.asyncio
    async def test_cancel_race_never_loses_nor_duplicates(
        self, layer: ChannelLayer, second_layer: ChannelLayer, kind: str
    ) -> None:
        """SPEC 12: cancel a receive at many points around a send: the message is returned
        by the cancelled call or by the next one, never lost, never both."""
        channel, sender = await self._route(layer, second_layer, kind)
        for n in range(40):
            task = asyncio.create_task(layer.receive(channel))
            for _ in range(n % 5):
                await asyncio.sleep(0)
            await sender.send(channel, {"n": n})
            for _ in range((n // 5) % 4):
                await asyncio.sleep(0)
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=GUARD)
            assert task in done, "a cancelled receive() did not finish"
            if task.cancelled():
                got = await recv(layer, channel)
            else:
                got = task.result()
            assert got == {"n": n}, f"round {n}: expected message {n}, got {got!r}"
        await assert_next_is_sentinel(layer, channel, sender=sender)

    @pytest.mark.parametrize("kind", KINDS)
    @pytest.mark.asyncio
    async def test_timeouts_do_not_lose_messages(
        self, layer: ChannelLayer, second_layer: ChannelLayer, kind: str
    ) -> None:
        """SPEC 12: ``wait_for(receive(), t)`` timing out repeatedly loses nothing later."""
        channel, sender = await self._route(layer, second_layer, kind)
        for _ in range(3):
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(layer.receive(channel), 0.02)
        await _send_all(sender, channel, [{"n": n} for n in range(3)])
        assert await _receive_n(layer, channel, 3) == [{"n": n} for n in range(3)]
        await assert_next_is_sentinel(layer, channel, sender=sender)

    @pytest.mark.parametrize("via", VIAS)
    @pytest.mark.asyncio
    async def test_cancel_with_buffered_messages(
        self, layer: ChannelLayer, second_layer: ChannelLayer, via: str
    ) -> None:
        """SPEC 12: cancelling receives while messages are buffered keeps all, in order."""
        sender = layer if via == "same-process" else second_layer
        channel = await layer.new_channel()
        await _send_all(sender, channel, [{"n": n} for n in range(10)])
        got: list[dict[str, Any]] = []
        for round_ in range(30):
            task = asyncio.create_task(layer.receive(channel))
            for _ in range(round_ % 3):
                await asyncio.sleep(0)
            task.cancel()
            await asyncio.wait({task}, timeout=GUARD)
            if not task.cancelled():
                got.append(task.result())
        while len(got) < 10:
            got.append(await recv(layer, channel))
        assert got == [{"n": n} for n in range(10)]
        await assert_next_is_sentinel(layer, channel)

    @pytest.mark.parametrize("via", VIAS)
    @pytest.mark.asyncio
    async def test_cancel_one_receiver_keeps_others(
        self, layer: ChannelLayer, second_layer: ChannelLayer, via: str
    ) -> None:
        """SPEC 12, 13: cancelling one channel's receive leaves the process's other
        receivers working (the shared claim machinery survives)."""
        sender = layer if via == "same-process" else second_layer
        first, second = await layer.new_channel(), await layer.new_channel()
        pending = asyncio.create_task(layer.receive(second))
        cancelled = asyncio.create_task(layer.receive(first))
        await asyncio.sleep(0)
        cancelled.cancel()
        await asyncio.wait({cancelled}, timeout=GUARD)
        await sender.send(second, {"to": "second"})
        assert await asyncio.wait_for(pending, GUARD) == {"to": "second"}
        await sender.send(first, {"to": "first"})
        assert await recv(layer, first) == {"to": "first"}

    @pytest.mark.asyncio
    async def test_cancel_does_not_leak_local_state(self, layer: ChannelLayer) -> None:
        """SPEC 12: cancelled receives on many channels leave no per-channel state behind."""
        local_state = getattr(layer, "local_state", None)
        if local_state is None:
            pytest.skip("layer does not expose local_state()")
        channels = [await layer.new_channel() for _ in range(50)]
        tasks = [asyncio.create_task(layer.receive(ch)) for ch in channels]
        await asyncio.sleep(0)
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks, timeout=GUARD)
        state = local_state()
        assert state["waiting_channels"] == 0, state
        assert state["buffered_channels"] == 0, state

    async def _reopened_holds_nothing(
        self, layer: ChannelLayer, channel: str, sender: ChannelLayer
    ) -> None:
        """A receive opens a closed channel anew, with nothing left from before. (A message
        sent before that receive would be dropped like any other for a departed consumer.)"""
        marker = {"type": "conformance.sentinel", "id": uuid.uuid4().hex}
        task = asyncio.create_task(recv(layer, channel))

        async def waiting() -> bool:
            return bool(layer.local_state()["waiting_channels"]) or task.done()

        await eventually(waiting, f"a receive waits on {channel!r}")
        await sender.send(channel, marker)
        got = await task
        assert got == marker, f"expected nothing left on {channel!r}, got {got!r}"

    async def _leave(self, layer: ChannelLayer, channel: str) -> None:
        """What Channels does when a consumer stops: cancel its pending receive."""
        task = asyncio.create_task(layer.receive(channel))
        await asyncio.sleep(0)
        task.cancel()
        await asyncio.wait({task}, timeout=GUARD)
        assert task.cancelled()

    @pytest.mark.parametrize("via", VIAS)
    @pytest.mark.asyncio
    async def test_departed_consumer_leaves_nothing_behind(
        self, make_layer: MakeLayer, via: str
    ) -> None:
        """SPEC 12: a consumer that left (its receive cancelled, none started again within
        ``consumer_grace``) leaves no buffer: what was buffered for it and every later
        message to its channel are dropped; the process's other channels carry on."""
        clock = ManualClock()
        layer = make_layer(clock=clock, consumer_grace=5, process_timeout=3600)
        sender = layer if via == "same-process" else make_layer(clock=clock, process_timeout=3600)
        gone, staying = await layer.new_channel(), await layer.new_channel()
        await self._leave(layer, gone)
        waiting = asyncio.create_task(layer.receive(staying))
        await sender.send(gone, {"n": 1})  # within the grace: kept for a consumer coming back
        await sender.send(staying, {"n": "a"})
        assert await asyncio.wait_for(waiting, GUARD) == {"n": "a"}
        assert layer.local_state()["buffered_channels"] == 1
        clock.advance(5.01)
        waiting = asyncio.create_task(layer.receive(staying))
        await sender.send(gone, {"n": 2})  # after it: dropped, as is what was buffered
        await sender.send(staying, {"n": "b"})
        assert await asyncio.wait_for(waiting, GUARD) == {"n": "b"}
        state = layer.local_state()
        assert state["buffered_channels"] == 0, state
        assert state["open_channels"] == 1, state
        await self._reopened_holds_nothing(layer, gone, sender)
        await assert_next_is_sentinel(layer, staying, sender)

    @pytest.mark.parametrize("via", VIAS)
    @pytest.mark.asyncio
    async def test_consumer_back_within_grace_gets_everything(
        self, make_layer: MakeLayer, via: str
    ) -> None:
        """SPEC 12: a receive cancelled and started again within ``consumer_grace`` (a
        ``wait_for`` timeout, a reconnecting helper) loses nothing; each cancellation
        starts the grace anew."""
        clock = ManualClock()
        layer = make_layer(clock=clock, consumer_grace=5, process_timeout=3600)
        sender = layer if via == "same-process" else make_layer(clock=clock, process_timeout=3600)
        channel = await layer.new_channel()
        await self._leave(layer, channel)
        await sender.send(channel, {"n": 0})
        clock.advance(4.9)
        assert await recv(layer, channel) == {"n": 0}
        await self._leave(layer, channel)
        await _send_all(sender, channel, [{"n": 1}, {"n": 2}])
        clock.advance(4.9)  # 9.8 s after the first cancellation, 4.9 s after the last
        assert await recv(layer, channel) == {"n": 1}
        assert await recv(layer, channel) == {"n": 2}
        await assert_next_is_sentinel(layer, channel, sender)

    @pytest.mark.asyncio
    async def test_departed_channel_closes_without_further_traffic(
        self, make_layer: MakeLayer
    ) -> None:
        """SPEC 12: the grace period ends on a timer: a process that goes quiet after its
        consumers left does not keep their buffers until the next purge."""
        layer = make_layer(consumer_grace=0.05)
        channel = await layer.new_channel()
        await self._leave(layer, channel)
        await layer.send(channel, {"type": "late"})
        assert layer.local_state()["buffered_channels"] == 1

        async def closed() -> bool:
            return not layer.local_state()["open_channels"]

        await eventually(closed, "the grace period's timer closes the channel")
        state = layer.local_state()
        assert state["open_channels"] == 0, state
        assert state["buffered_channels"] == 0, state

    @pytest.mark.asyncio
    async def test_zero_grace_drops_at_cancellation(self, make_layer: MakeLayer) -> None:
        """SPEC 12: ``consumer_grace=0`` closes a channel when its receive is cancelled, as
        channels_redis drops its buffer; another channel waiting meanwhile is untouched."""
        layer = make_layer(consumer_grace=0)
        gone, staying = await layer.new_channel(), await layer.new_channel()
        await self._leave(layer, gone)
        await layer.send(gone, {"type": "late"})
        await layer.send(staying, {"type": "kept"})
        assert layer.local_state()["buffered_channels"] == 1
        assert await recv(layer, staying) == {"type": "kept"}
        await self._reopened_holds_nothing(layer, gone, layer)

    @pytest.mark.asyncio
    async def test_channel_never_received_on_closes_after_group_expiry(
        self, make_layer: MakeLayer
    ) -> None:
        """SPEC 12: a channel with no receive for ``group_expiry`` (a consumer that stopped
        from a channel message, leaving no cancellation; a name never used) is closed at a
        sweep; one whose receive has been waiting all that time is not."""
        clock = ManualClock()
        layer = make_layer(
            clock=clock, expiry=10**6, group_expiry=100, purge_interval=1, process_timeout=3600
        )
        unused, waited = await layer.new_channel(), await layer.new_channel()
        await layer.send(unused, {"type": "never read"})
        waiting = asyncio.create_task(layer.receive(waited))
        await asyncio.sleep(0)
        clock.advance(101)

        async def swept() -> bool:
            return layer.local_state()["open_channels"] <= 1

        await eventually(swept, "a sweep closes the channel nobody received on")
        assert layer.local_state()["open_channels"] == 1
        assert layer.local_state()["buffered_channels"] == 0
        await layer.send(waited, {"type": "still served"})
        assert await asyncio.wait_for(waiting, GUARD) == {"type": "still served"}
        await self._reopened_holds_nothing(layer, unused, layer)

    # ===================================================== no stalls (SPEC 13)

    @pytest.mark.asyncio
    async def test_unread_channel_does_not_stall_others(self, make_layer: MakeLayer) -> None:
        """SPEC 13: a process-specific channel nobody reads, full locally and in storage,
        never keeps its process's other channels from receiving."""
        layer, other = make_layer(capacity=20), make_layer(capacity=20)
        stuck, live = await layer.new_channel(), await layer.new_channel()
        await _send_all(other, stuck, [{"n": n} for n in range(20)])
        await other.send(live, {"live": 1})
        # Receiving claims for the whole process: the stuck channel's buffer fills up.
        assert await recv(layer, live) == {"live": 1}
        # Storage fills up again behind the full buffer.
        await _send_all(other, stuck, [{"n": n} for n in range(20, 40)])
        for round_ in range(2, 5):
            await other.send(live, {"live": round_})
            assert await recv(layer, live) == {"live": round_}
        got = await _receive_n(layer, stuck, 40)
        assert got == [{"n": n} for n in range(40)]

    @pytest.mark.asyncio
    async def test_busy_channel_does_not_stall_others(self, make_layer: MakeLayer) -> None:
        """SPEC 13: hundreds of queued messages on one channel do not delay another."""
        layer, other = make_layer(capacity=1000), make_layer(capacity=1000)
        busy, quiet = await layer.new_channel(), await layer.new_channel()
        await _send_all(other, busy, [{"n": n} for n in range(400)])
        await other.send(quiet, {"quiet": True})
        assert await recv(layer, quiet) == {"quiet": True}
        assert await _receive_n(layer, busy, 400) == [{"n": n} for n in range(400)]

    @pytest.mark.asyncio
    async def test_waiting_receive_does_not_stall_others(
        self, layer: ChannelLayer, second_layer: ChannelLayer
    ) -> None:
        """SPEC 13: receivers parked on idle channels do not hold up busy ones."""
        idle = [asyncio.create_task(layer.receive(f"idle-{n}")) for n in range(5)]
        idle.append(asyncio.create_task(layer.receive(await layer.new_channel())))
        try:
            for n in range(10):
                await second_layer.send("busy", {"n": n})
                assert await recv(layer, "busy") == {"n": n}
        finally:
            for task in idle:
                task.cancel()
            await asyncio.wait(idle, timeout=GUARD)

    # ================================================================ capacity (SPEC 14-17)

    @pytest.mark.asyncio
    async def test_default_capacity_is_100(self, layer: ChannelLayer) -> None:
        """SPEC 14, 15: without configuration a channel holds exactly 100 messages."""
        assert await fill(layer, "default-cap") == 100

    @pytest.mark.parametrize("capacity", [1, 3, 17])
    @pytest.mark.asyncio
    async def test_capacity_exact(self, make_layer: MakeLayer, capacity: int) -> None:
        """SPEC 14, 15: ``ChannelFull`` exactly at ``capacity``."""
        layer = make_layer(capacity=capacity)
        assert await fill(layer, "c") == capacity
        await recv(layer, "c")
        await layer.send("c", {"again": True})
        with pytest.raises(ChannelFull):
            await layer.send("c", {"again": False})

    @pytest.mark.asyncio
    async def test_channel_capacity_globs_and_regex(self, make_layer: MakeLayer) -> None:
        """SPEC 14: glob strings and compiled regexes; the full name is matched."""
        layer = make_layer(
            capacity=3,
            channel_capacity={
                "small.*": 2,
                "big*": 5,
                re.compile(r"^rx\d+$"): 1,
                "room-?": 4,
                "specific.*": 6,
            },
        )
        assert await fill(layer, "small.one") == 2
        assert await fill(layer, "bigger") == 5
        assert await fill(layer, "rx12") == 1
        assert await fill(layer, "rx12a") == 3
        assert await fill(layer, "room-1") == 4
        assert await fill(layer, "room-12") == 3
        assert await fill(layer, "plain") == 3
        assert await fill(layer, "specific.someproc!x") == 6

    @pytest.mark.asyncio
    async def test_channel_capacity_first_match_wins(self, make_layer: MakeLayer) -> None:
        """SPEC 14: rules are tried in order; the first match wins."""
        layer = make_layer(capacity=7, channel_capacity={"ab*": 1, "a*": 4})
        assert await fill(layer, "abc") == 1
        assert await fill(layer, "axe") == 4
        other = make_layer(capacity=7, channel_capacity={"a*": 4, "ab*": 1})
        assert await fill(other, "abd") == 4

    @pytest.mark.asyncio
    async def test_channel_capacity_applies_to_group_send(self, make_layer: MakeLayer) -> None:
        """SPEC 14, 16: group_send uses each member's own capacity."""
        layer = make_layer(capacity=10, channel_capacity={"tight*": 1})
        await layer.group_add("g", "tight1")
        await layer.group_add("g", "loose1")
        for n in range(3):
            await layer.group_send("g", {"n": n})
        assert await recv(layer, "tight1") == {"n": 0}
        assert await _receive_n(layer, "loose1", 3) == [{"n": n} for n in range(3)]
        await assert_next_is_sentinel(layer, "tight1")

    @pytest.mark.asyncio
    async def test_capacity_concurrent_instances(self, make_layer: MakeLayer) -> None:
        """SPEC 15: concurrent senders in two instances: exactly ``capacity`` accepted."""
        first, second = make_layer(capacity=20), make_layer(capacity=20)

        async def attempt(layer: ChannelLayer, n: int) -> bool:
            try:
                await layer.send("race", {"n": n})
            except ChannelFull:
                return False
            return True

        flags = await asyncio.gather(*(attempt(first if n % 2 else second, n) for n in range(60)))
        assert flags.count(True) == 20
        got = await _receive_n(first, "race", 20)
        assert {m["n"] for m in got} == {n for n, ok in enumerate(flags) if ok}

    @pytest.mark.asyncio
    async def test_capacity_one_ping_pong_between_instances(self, make_layer: MakeLayer) -> None:
        """SPEC 14: a received message no longer counts against its channel's capacity. Two
        instances (two processes) play ping-pong on channels of capacity 1: each message goes
        out as soon as the reply to the one before arrived, and never finds the channel full
        (a core that hands messages on before removing them from storage must remove them
        first on such a channel)."""
        left, right = make_layer(capacity=1), make_layer(capacity=1)
        mine, theirs = await left.new_channel(), await right.new_channel()

        async def echo() -> None:
            while True:
                await left.send(theirs, await left.receive(mine))

        echoing = asyncio.ensure_future(echo())
        try:
            for n in range(30):
                await right.send(mine, {"n": n})
                assert await recv(right, theirs) == {"n": n}
        finally:
            echoing.cancel()
            await asyncio.gather(echoing, return_exceptions=True)

    @pytest.mark.asyncio
    async def test_capacity_concurrent_event_loops(self, make_layer: MakeLayer) -> None:
        """SPEC 15, 23: senders on three threads' own loops and the main loop: exactly
        ``capacity`` accepted."""
        layer = make_layer(capacity=25)

        async def sender(tag: int) -> int:
            accepted = 0
            for n in range(15):
                try:
                    await layer.send("race", {"tag": tag, "n": n})
                except ChannelFull:
                    continue
                accepted += 1
            return accepted

        counts = await asyncio.gather(
            sender(0),
            *(asyncio.to_thread(run_in_new_loop, sender, tag) for tag in (1, 2, 3)),
        )
        assert sum(counts) == 25
        assert len(await _receive_n(layer, "race", 25)) == 25

    @pytest.mark.asyncio
    async def test_capacity_ignores_expired(self, make_layer: MakeLayer) -> None:
        """SPEC 15, 18: expired messages do not count towards capacity."""
        clock = ManualClock()
        layer = make_layer(capacity=2, expiry=10, clock=clock, process_timeout=3600)
        assert await fill(layer, "c") == 2
        clock.advance(10.5)
        assert await fill(layer, "c") == 2

    @pytest.mark.asyncio
    async def test_group_send_never_raises_channel_full(
        self, make_layer: MakeLayer, caplog: pytest.LogCaptureFixture
    ) -> None:
        """SPEC 16: full members miss the message, others get it, nothing raises; the
        layer logs how many were skipped."""
        caplog.set_level(logging.DEBUG)
        layer, other = make_layer(capacity=2), make_layer(capacity=2)
        full_own = await layer.new_channel()
        full_other = await other.new_channel()
        full = [(layer, "full-member"), (layer, full_own), (other, full_other)]
        for _, member in full:
            await layer.group_add("g", member)
        await layer.group_add("g", "free-member")
        for _, member in full:
            assert await fill(layer, member) == 2
        await layer.group_send("g", {"type": "group"})
        assert await recv(layer, "free-member") == {"type": "group"}
        for reader, member in full:
            assert await _receive_n(reader, member, 2) == [
                {"type": "fill", "n": 0},
                {"type": "fill", "n": 1},
            ]
            await assert_next_is_sentinel(reader, member)
        skipped = [
            r
            for r in caplog.records
            if r.name.startswith("channels_lite")
            and r.levelno >= logging.INFO
            and "3" in r.getMessage()
            and any(word in r.getMessage().lower() for word in ("full", "capacity", "skip"))
        ]
        assert skipped, "group_send should log how many members it skipped"

    @pytest.mark.parametrize("via", VIAS)
    @pytest.mark.asyncio
    async def test_process_specific_capacity_is_per_channel(
        self, make_layer: MakeLayer, via: str
    ) -> None:
        """SPEC 15, 17: capacity applies to each full channel name, exactly, not shared by
        the process's ``prefix!*`` channels."""
        layer = make_layer(capacity=2)
        sender = layer if via == "same-process" else make_layer(capacity=2)
        foreign = ["specific.otherproc!a", "specific.otherproc!b", "other.otherproc!c"]
        for channel in foreign:
            assert await fill(sender, channel) == 2
        mine = [await layer.new_channel() for _ in range(2)]
        mine.append(await layer.new_channel(prefix="other"))
        for channel in mine:
            assert await fill(sender, channel) == 2
        for channel in mine:
            assert len(await _receive_n(layer, channel, 2)) == 2

    # ================================================================== expiry (SPEC 18)

    @pytest.mark.asyncio
    async def test_expired_message_never_delivered(self, make_layer: MakeLayer) -> None:
        """SPEC 18: a message older than ``expiry`` is not delivered (checked on read)."""
        clock = ManualClock()
        layer = make_layer(expiry=10, clock=clock, process_timeout=3600)
        await layer.send("c", {"type": "stale"})
        clock.advance(10.01)
        await assert_next_is_sentinel(layer, "c")

    @pytest.mark.asyncio
    async def test_message_delivered_before_expiry(self, make_layer: MakeLayer) -> None:
        """SPEC 18: a message younger than ``expiry`` is delivered."""
        clock = ManualClock()
        layer = make_layer(expiry=10, clock=clock, process_timeout=3600)
        await layer.send("c", {"type": "fresh"})
        clock.advance(9.9)
        assert await recv(layer, "c") == {"type": "fresh"}

    @pytest.mark.asyncio
    async def test_fractional_expiry(self, make_layer: MakeLayer) -> None:
        """SPEC 18: ``expiry`` may be a float."""
        clock = ManualClock()
        layer = make_layer(expiry=0.5, clock=clock, process_timeout=3600)
        await layer.send("c", {"n": 1})
        clock.advance(0.4)
        await layer.send("c", {"n": 2})
        clock.advance(0.2)
        assert await recv(layer, "c") == {"n": 2}
        await assert_next_is_sentinel(layer, "c")

    @pytest.mark.asyncio
    async def test_default_expiry_is_60_seconds(self, driver_options: dict[str, Any]) -> None:
        """SPEC 18: with no ``expiry`` in CONFIG a message lives 60 seconds (README
        **Configuration**): delivered 59.9 s after it was sent, never 60.1 s after."""
        clock = ManualClock()
        async with _layer_with_default_expiries(
            driver_options, clock=clock, process_timeout=10**6
        ) as layer:
            await layer.send("c", {"type": "fresh"})
            clock.advance(59.9)
            assert await recv(layer, "c") == {"type": "fresh"}
            await layer.send("c", {"type": "stale"})
            clock.advance(60.1)
            await assert_next_is_sentinel(layer, "c")

    @pytest.mark.asyncio
    async def test_expiry_across_instances(self, make_layer: MakeLayer) -> None:
        """SPEC 18: another instance never delivers an expired message either."""
        clock = ManualClock()
        sender = make_layer(expiry=10, clock=clock, process_timeout=3600)
        reader = make_layer(expiry=10, clock=clock, process_timeout=3600)
        await sender.send("c", {"type": "stale"})
        await sender.group_add("g", "c")
        await sender.group_send("g", {"type": "stale-group"})
        clock.advance(11)
        await assert_next_is_sentinel(reader, "c", sender=sender)

    @pytest.mark.parametrize("via", VIAS)
    @pytest.mark.asyncio
    async def test_expiry_of_locally_buffered_message(
        self, make_layer: MakeLayer, via: str
    ) -> None:
        """SPEC 18: a message already in the process's local buffer is still never
        delivered once expired."""
        clock = ManualClock()
        layer = make_layer(expiry=10, clock=clock, process_timeout=3600)
        sender = (
            layer
            if via == "same-process"
            else make_layer(expiry=10, clock=clock, process_timeout=3600)
        )
        buffered, other = await layer.new_channel(), await layer.new_channel()
        await sender.send(buffered, {"type": "stale"})
        await sender.send(other, {"type": "pull"})
        # Receiving on the same process key claims the older message into a local buffer.
        assert await recv(layer, other) == {"type": "pull"}
        clock.advance(10.5)
        await assert_next_is_sentinel(layer, buffered, sender=sender)

    # ============================================================ group expiry (SPEC 19)

    @pytest.mark.asyncio
    async def test_group_membership_expires(self, make_layer: MakeLayer) -> None:
        """SPEC 19: a membership older than ``group_expiry`` is gone."""
        clock = ManualClock()
        layer = make_layer(group_expiry=20, clock=clock, process_timeout=3600)
        await layer.group_add("g", "member")
        clock.advance(20.5)
        await layer.group_send("g", {"type": "too-late"})
        await assert_next_is_sentinel(layer, "member")

    @pytest.mark.asyncio
    async def test_group_membership_lives_until_expiry(self, make_layer: MakeLayer) -> None:
        """SPEC 19: a membership younger than ``group_expiry`` still receives."""
        clock = ManualClock()
        layer = make_layer(group_expiry=20, clock=clock, process_timeout=3600)
        await layer.group_add("g", "member")
        clock.advance(19.5)
        await layer.group_send("g", {"type": "in-time"})
        assert await recv(layer, "member") == {"type": "in-time"}

    @pytest.mark.asyncio
    async def test_default_group_expiry_is_86400_seconds(
        self, driver_options: dict[str, Any]
    ) -> None:
        """SPEC 19: with no ``group_expiry`` in CONFIG a membership lives 86400 seconds (one
        day, README **Configuration**): a group_send 86399.9 s after ``group_add`` reaches the
        member, one at 86400.1 s does not."""
        clock = ManualClock()
        async with _layer_with_default_expiries(
            driver_options, clock=clock, process_timeout=10**6
        ) as layer:
            await layer.group_add("g", "member")
            clock.advance(86399.9)
            await layer.group_send("g", {"type": "in-time"})
            assert await recv(layer, "member") == {"type": "in-time"}
            clock.advance(0.2)
            await layer.group_send("g", {"type": "too-late"})
            await assert_next_is_sentinel(layer, "member")

    @pytest.mark.asyncio
    async def test_group_add_refreshes(self, make_layer: MakeLayer) -> None:
        """SPEC 19: ``group_add`` again restarts the membership's lifetime."""
        clock = ManualClock()
        layer = make_layer(group_expiry=20, clock=clock, process_timeout=3600)
        await layer.group_add("g", "member")
        clock.advance(15)
        await layer.group_add("g", "member")
        clock.advance(15)
        await layer.group_send("g", {"type": "refreshed"})
        assert await recv(layer, "member") == {"type": "refreshed"}
        clock.advance(6)
        await layer.group_send("g", {"type": "expired"})
        await assert_next_is_sentinel(layer, "member")

    @pytest.mark.asyncio
    async def test_group_add_idempotent(self, layer: ChannelLayer) -> None:
        """SPEC 19: adding twice still delivers one copy per group_send."""
        for _ in range(3):
            await layer.group_add("g", "member")
        await layer.group_send("g", {"type": "once"})
        assert await recv(layer, "member") == {"type": "once"}
        await assert_next_is_sentinel(layer, "member")

    @pytest.mark.asyncio
    async def test_group_discard(self, layer: ChannelLayer, second_layer: ChannelLayer) -> None:
        """SPEC 19, 21: discarded members stop receiving; discarding a non-member or from an
        unknown group is a no-op; another instance can discard."""
        await layer.group_discard("g", "never-member")
        await layer.group_discard("unknown-group", "member")
        await layer.group_add("g", "member")
        await layer.group_add("g", "stays")
        await second_layer.group_discard("g", "member")
        await layer.group_send("g", {"type": "after-discard"})
        assert await recv(layer, "stays") == {"type": "after-discard"}
        await assert_next_is_sentinel(layer, "member")
        await layer.group_discard("g", "member")

    # ================================================================ dead members (SPEC 20)

    @pytest.mark.asyncio
    async def test_close_releases_process_memberships(
        self, driver: Driver, make_layer: MakeLayer
    ) -> None:
        """SPEC 20, 24: a process that closes its layer leaves no memberships behind (with a
        driver implementing SupportsLiveness)."""
        if not isinstance(driver, SupportsLiveness):
            pytest.skip("driver has no SupportsLiveness: memberships last until group_expiry")
        leaving, staying = make_layer(), make_layer()
        gone = await leaving.new_channel()
        await leaving.group_add("room", gone)
        await staying.group_add("room", "plain")
        assert sorted(await driver.group_channels("room", _wall_now())) == sorted([gone, "plain"])
        await leaving.close()
        assert await driver.group_channels("room", _wall_now()) == ["plain"]

    @pytest.mark.asyncio
    async def test_dead_process_members_reaped(self, driver: Driver, make_layer: MakeLayer) -> None:
        """SPEC 20: members and messages of a process whose lease lapsed are removed by the
        surviving processes."""
        if not isinstance(driver, SupportsLiveness):
            pytest.skip("driver has no SupportsLiveness: dead members go at group_expiry")
        clock = ManualClock()
        survivor = make_layer(clock=clock, process_timeout=0.4)
        dead_channel = "specific.deadproc!x"
        # A process that took a lease, joined a group, got a message, then died silently.
        await driver.heartbeat("deadproc!", clock() + 0.4, clock())
        await survivor.group_add("room", dead_channel)
        await survivor.send(dead_channel, {"type": "for-the-dead"})
        mine = await survivor.new_channel()
        await survivor.group_add("room", mine)
        clock.advance(1.0)

        async def reaped() -> bool:
            # Time goes on: after one jump and no more, the survivor's renewal would look late
            # (as after a stall of the whole storage), and a late renewal reaps nobody; the
            # next one, on time, does.
            clock.advance(0.02)
            return dead_channel not in await driver.group_channels("room", clock())

        await eventually(reaped, "the dead process's membership is reaped")
        assert await claim(driver, "deadproc!", now=clock()) == []
        await survivor.group_send("room", {"type": "alive"})
        assert await recv(survivor, mine) == {"type": "alive"}

    @pytest.mark.asyncio
    async def test_lease_is_stored_before_the_first_channel_is_handed_out(
        self, driver: Driver, make_layer: MakeLayer
    ) -> None:
        """SPEC 20: once ``new_channel`` returned, the process's lease is in storage, so a
        process killed right after joining a group is reaped like any other (no window in
        which its membership would outlive it until group_expiry)."""
        if not isinstance(driver, SupportsLiveness):
            pytest.skip("driver has no SupportsLiveness: dead members go at group_expiry")
        clock = ManualClock()
        doomed = make_layer(clock=clock, process_timeout=0.4)
        channel = await doomed.new_channel()
        # Straight away: the layer's background renewals have had no chance to run yet.
        reaped = await driver.heartbeat("other!", clock() + 100, clock() + 0.4)
        assert reaped == [naming.routing_key(channel)]

    # ================================================================ groups (SPEC 21)

    @pytest.mark.asyncio
    async def test_group_send_reaches_every_member(
        self, layer: ChannelLayer, second_layer: ChannelLayer
    ) -> None:
        """SPEC 21: members in this process, another process, normal and specific channels
        each get one copy; members may be added by another instance."""
        mine = await layer.new_channel()
        theirs = await second_layer.new_channel()
        await layer.group_add("room", mine)
        await second_layer.group_add("room", theirs)
        await second_layer.group_add("room", "plain-member")
        await second_layer.group_add("room", await layer.new_channel())  # never read
        await layer.group_send("room", {"type": "hello"})
        assert await recv(layer, mine) == {"type": "hello"}
        assert await recv(second_layer, theirs) == {"type": "hello"}
        assert await recv(layer, "plain-member") == {"type": "hello"}
        for lay, ch in ((layer, mine), (second_layer, theirs), (layer, "plain-member")):
            await assert_next_is_sentinel(lay, ch)

    @pytest.mark.asyncio
    async def test_group_send_to_receiver_in_other_loop(self, layer: ChannelLayer) -> None:
        """SPEC 21, 23: a member receiving on a thread's own event loop gets group
        messages."""
        channel = await layer.new_channel()
        await layer.group_add("room", channel)
        receiving = asyncio.ensure_future(asyncio.to_thread(run_in_new_loop, recv, layer, channel))
        await layer.group_send("room", {"type": "cross-loop"})
        assert await asyncio.wait_for(receiving, GUARD * 2) == {"type": "cross-loop"}

    @pytest.mark.asyncio
    async def test_group_send_empty_or_unknown(self, layer: ChannelLayer) -> None:
        """SPEC 21: group_send to an unknown or emptied group is a no-op."""
        await layer.group_send("nobody", {"type": "void"})
        await layer.group_add("emptied", "member")
        await layer.group_discard("emptied", "member")
        await layer.group_send("emptied", {"type": "void"})
        await assert_next_is_sentinel(layer, "member")

    @pytest.mark.asyncio
    async def test_group_send_many_members(self, layer: ChannelLayer) -> None:
        """SPEC 21: a group of 250 members: every member gets exactly one copy."""
        members = [f"member.{n}" for n in range(250)]
        for member in members:
            await layer.group_add("crowd", member)
        await layer.group_send("crowd", {"type": "all"})
        got = await asyncio.wait_for(
            asyncio.gather(*(layer.receive(m) for m in members)), GUARD * 2
        )
        assert got == [{"type": "all"}] * 250
        await assert_next_is_sentinel(layer, members[0])
        await assert_next_is_sentinel(layer, members[-1])

    @pytest.mark.asyncio
    async def test_channel_in_several_groups(self, layer: ChannelLayer) -> None:
        """SPEC 21: one channel in two groups gets each group's messages."""
        await layer.group_add("a", "member")
        await layer.group_add("b", "member")
        await layer.group_send("a", {"from": "a"})
        await layer.group_send("b", {"from": "b"})
        assert await _receive_n(layer, "member", 2) == [{"from": "a"}, {"from": "b"}]
        await layer.group_discard("a", "member")
        await layer.group_send("a", {"from": "a"})
        await layer.group_send("b", {"from": "b2"})
        assert await recv(layer, "member") == {"from": "b2"}

    # ================================================================== flush (SPEC 22)

    @pytest.mark.asyncio
    async def test_flush_empties_messages_and_groups(
        self, layer: ChannelLayer, second_layer: ChannelLayer
    ) -> None:
        """SPEC 22: flush drops stored messages and memberships, visible to every
        instance."""
        specific = await second_layer.new_channel()
        await second_layer.send("plain", {"type": "old"})
        await layer.send(specific, {"type": "old"})
        await second_layer.group_add("g", "plain")
        await second_layer.group_add("g", specific)
        await layer.flush()
        await second_layer.group_send("g", {"type": "after-flush"})
        await assert_next_is_sentinel(second_layer, "plain")
        await assert_next_is_sentinel(second_layer, specific, sender=layer)
        await assert_next_is_sentinel(layer, "plain", sender=second_layer)

    @pytest.mark.asyncio
    async def test_flush_reaches_other_instances_own_messages(
        self, layer: ChannelLayer, second_layer: ChannelLayer
    ) -> None:
        """SPEC 22: flush from one instance also drops messages another instance sent to
        its own process-specific channels ("visible to every instance")."""
        specific = await second_layer.new_channel()
        await second_layer.send(specific, {"type": "old"})
        await second_layer.group_add("g", specific)
        await second_layer.group_send("g", {"type": "old-group"})
        await layer.flush()
        await assert_next_is_sentinel(second_layer, specific)

    @pytest.mark.parametrize("via", VIAS)
    @pytest.mark.asyncio
    async def test_flush_resets_local_buffers(
        self, layer: ChannelLayer, second_layer: ChannelLayer, via: str
    ) -> None:
        """SPEC 22: messages already in this process's buffers are dropped by its flush."""
        sender = layer if via == "same-process" else second_layer
        buffered, other = await layer.new_channel(), await layer.new_channel()
        await _send_all(sender, buffered, [{"n": n} for n in range(5)])
        await sender.send(other, {"type": "pull"})
        # Receiving claims for the whole process: the other channel's messages get buffered.
        assert await recv(layer, other) == {"type": "pull"}
        await layer.flush()
        await assert_next_is_sentinel(layer, buffered, sender=sender)

    @pytest.mark.parametrize("kind", KINDS)
    @pytest.mark.asyncio
    async def test_flush_while_receiver_waits(
        self, layer: ChannelLayer, second_layer: ChannelLayer, kind: str
    ) -> None:
        """SPEC 12, 22: a receive waiting during flush keeps working afterwards."""
        channel, sender = await self._route(layer, second_layer, kind)
        waiting = asyncio.create_task(layer.receive(channel))
        await asyncio.sleep(0)
        await layer.flush()
        assert not waiting.done()
        await sender.send(channel, {"type": "after-flush"})
        assert await asyncio.wait_for(waiting, GUARD) == {"type": "after-flush"}

    @pytest.mark.asyncio
    async def test_flush_restores_capacity(self, make_layer: MakeLayer) -> None:
        """SPEC 15, 22: after flush a full channel has room again."""
        layer = make_layer(capacity=2)
        assert await fill(layer, "c") == 2
        await layer.flush()
        assert await fill(layer, "c") == 2

    # ===================================================== event loops (SPEC 23)

    @pytest.mark.asyncio
    async def test_send_from_sync_code(self, layer: ChannelLayer) -> None:
        """SPEC 23: ``async_to_sync(layer.send)`` from a thread (a new loop each call)."""
        channel = await layer.new_channel()
        for n in range(5):
            await asyncio.to_thread(run_in_new_loop, layer.send, channel, {"n": n})
        await asyncio.to_thread(run_in_new_loop, layer.group_add, "g", channel)
        await asyncio.to_thread(run_in_new_loop, layer.group_send, "g", {"n": "group"})
        got = await _receive_n(layer, channel, 6)
        assert got == [{"n": n} for n in range(5)] + [{"n": "group"}]

    @pytest.mark.parametrize("kind", KINDS)
    @pytest.mark.asyncio
    async def test_receive_from_sync_code(
        self, layer: ChannelLayer, second_layer: ChannelLayer, kind: str
    ) -> None:
        """SPEC 23: ``async_to_sync(layer.receive)`` in a thread while the main loop sends."""
        channel, sender = await self._route(layer, second_layer, kind)
        receiving = asyncio.ensure_future(asyncio.to_thread(run_in_new_loop, recv, layer, channel))
        await sender.send(channel, {"type": "to-thread"})
        assert await asyncio.wait_for(receiving, GUARD * 2) == {"type": "to-thread"}
        await assert_next_is_sentinel(layer, channel, sender=sender)

    @pytest.mark.asyncio
    async def test_alternating_event_loops(self, layer: ChannelLayer) -> None:
        """SPEC 23: main loop and a series of short-lived loops take turns; each loop's
        resources go away with it."""
        channel = await layer.new_channel()
        for n in range(8):
            await asyncio.to_thread(run_in_new_loop, layer.send, channel, {"n": n, "from": "t"})
            assert await recv(layer, channel) == {"n": n, "from": "t"}
            await layer.send(channel, {"n": n, "from": "main"})
            got = await asyncio.to_thread(run_in_new_loop, recv, layer, channel)
            assert got == {"n": n, "from": "main"}
        local_state = getattr(layer, "local_state", None)
        if local_state is not None:
            state = local_state()
            assert state["loops"] <= 1, f"loops that closed are still tracked: {state}"
            assert state["waiting_channels"] == 0, state

    @pytest.mark.asyncio
    async def test_first_used_by_a_loop_that_closes(self, layer: ChannelLayer) -> None:
        """SPEC 23: a layer first used (and received on) by a short-lived loop keeps
        working on the next loop."""
        channel = await layer.new_channel()

        async def first_use() -> dict[str, Any]:
            await layer.send(channel, {"type": "first"})
            return await recv(layer, channel)

        assert await asyncio.to_thread(run_in_new_loop, first_use) == {"type": "first"}
        await layer.send(channel, {"type": "second"})
        assert await recv(layer, channel) == {"type": "second"}
        await layer.send("plain", {"type": "third"})
        assert await recv(layer, "plain") == {"type": "third"}

    @pytest.mark.asyncio
    async def test_concurrent_loops_share_one_layer(self, layer: ChannelLayer) -> None:
        """SPEC 23: the server's loop and a sync worker's loop use one layer at the same
        time, sending to each other."""
        main_channel, worker_channel = await layer.new_channel(), await layer.new_channel()

        async def worker() -> list[int]:
            seen = []
            for n in range(10):
                message = await recv(layer, worker_channel)
                seen.append(message["n"])
                await layer.send(main_channel, {"n": n})
            return seen

        working = asyncio.ensure_future(asyncio.to_thread(run_in_new_loop, worker))
        for n in range(10):
            await layer.send(worker_channel, {"n": n})
            assert await recv(layer, main_channel) == {"n": n}
        assert await asyncio.wait_for(working, GUARD) == list(range(10))

    # ================================================================ close (SPEC 24)

    @pytest.mark.asyncio
    async def test_close_idempotent_and_alias(self, make_layer: MakeLayer) -> None:
        """SPEC 24: close() twice, close_pools(), and closing an unused layer are fine."""
        unused = make_layer()
        await unused.close()
        await unused.close()
        used = make_layer()
        await used.send("c", {"type": "x"})
        await used.close_pools()
        await used.close()
        local_state = getattr(used, "local_state", None)
        if local_state is not None:
            assert local_state()["loops"] == 0

    @pytest.mark.asyncio
    async def test_close_keeps_stored_messages(self, make_layer: MakeLayer) -> None:
        """SPEC 24: close releases resources, not data: another instance still reads."""
        writer, reader = make_layer(), make_layer()
        await writer.send("c", {"type": "kept"})
        await writer.close()
        assert await recv(reader, "c") == {"type": "kept"}

    @pytest.mark.asyncio
    async def test_close_after_use_from_several_loops(self, layer: ChannelLayer) -> None:
        """SPEC 23, 24: close after other loops used the layer releases everything."""
        channel = await layer.new_channel()
        await asyncio.to_thread(run_in_new_loop, layer.send, channel, {"type": "x"})
        assert await recv(layer, channel) == {"type": "x"}
        await layer.close()
        local_state = getattr(layer, "local_state", None)
        if local_state is not None:
            state = local_state()
            assert state["loops"] == 0, state
            assert state["waiting_channels"] == 0, state

    # ================================================== construction errors (SPEC 25)

    def test_driver_constructor_error_propagates(self) -> None:
        """SPEC 25: an exception raised while constructing the backend reaches the caller
        unchanged (not wrapped, not swallowed)."""
        with pytest.raises(ConstructionError, match="on purpose") as info:
            ChannelLayer(driver="channels_lite.conformance._support:ExplodingDriver")
        assert type(info.value) is ConstructionError

    # ============================================================ configuration (SPEC 26)

    def test_valid_configuration_accepted(self, driver_options: dict[str, Any]) -> None:
        """SPEC 26: every documented key with a sensible value is accepted."""
        ChannelLayer(
            **{
                **driver_options,
                "expiry": 0.5,
                "group_expiry": 3600,
                "capacity": 5,
                "channel_capacity": {"a*": 1, re.compile("^b"): 2},
                "serializer_format": "json",
                "symmetric_encryption_keys": ["k1", "k2"],
                "max_message_size": 1024,
                "poll_interval": 0.5,
                "purge_interval": 10,
                "process_timeout": 20,
                "clock": ManualClock(),
            }
        )

    @pytest.mark.parametrize(("key", "value"), BAD_CONFIG, ids=lambda v: repr(v)[:30])
    def test_bad_configuration_names_the_key(
        self, driver_options: dict[str, Any], key: str, value: object
    ) -> None:
        """SPEC 26: a wrong type or impossible value is an InvalidChannelLayerError-style
        ConfigurationError naming the key, raised at construction."""
        with pytest.raises(ConfigurationError) as info:
            ChannelLayer(**{**driver_options, key: value})
        assert isinstance(info.value, InvalidChannelLayerError)
        assert info.value.key is not None
        assert info.value.key.startswith(key), (info.value.key, key)
        assert key in str(info.value)

    @pytest.mark.parametrize("key", ["bogus_key", "capacty", "expiry_seconds"])
    def test_unknown_key_names_it(self, driver_options: dict[str, Any], key: str) -> None:
        """SPEC 26: an unknown key (a typo) is refused, naming it."""
        with pytest.raises(ConfigurationError) as info:
            ChannelLayer(**{**driver_options, key: 1})
        assert isinstance(info.value, InvalidChannelLayerError)
        assert info.value.key == key
        assert key in str(info.value)

    def test_unknown_driver_lists_installed(self, driver_options: dict[str, Any]) -> None:
        """SPEC 26: an unknown driver name is refused, listing the installed drivers."""
        from channels_lite.drivers.registry import available_drivers

        options = {k: v for k, v in driver_options.items() if k != "driver"}
        with pytest.raises(ConfigurationError) as info:
            ChannelLayer(**options, driver="no-such-driver-xyz")
        assert info.value.key == "driver"
        message = str(info.value)
        assert "no-such-driver-xyz" in message
        for name in available_drivers():
            assert name in message, f"{name!r} missing from {message!r}"

    def test_unimportable_driver_path(self, driver_options: dict[str, Any]) -> None:
        """SPEC 26: a ``package.module:Class`` that does not import is a configuration
        error naming ``driver``."""
        options = {k: v for k, v in driver_options.items() if k != "driver"}
        for path in ("no_such_module_xyz:Driver", "channels_lite:NoSuchClass", "json:dumps"):
            with pytest.raises(ConfigurationError) as info:
                ChannelLayer(**options, driver=path)
            assert info.value.key == "driver"

    # =========================================================== encryption (SPEC 26, 7)

    @pytest.mark.parametrize("serializer", ["msgpack", "json"])
    @pytest.mark.asyncio
    async def test_encryption_round_trip_and_at_rest(
        self, make_layer: MakeLayer, driver: Driver, serializer: str
    ) -> None:
        """SPEC 26 (symmetric_encryption_keys): messages round-trip and are not readable in
        storage."""
        layer = make_layer(symmetric_encryption_keys=["secret"], serializer_format=serializer)
        message = {"type": "x", "text": "plaintext-marker", "bytes": b"binary-marker"}
        await layer.send("enc", message)
        assert await recv(layer, "enc") == message
        await layer.send("enc", message)
        (stored,) = await claim(driver, "enc", now=_wall_now())
        assert b"plaintext-marker" not in stored.payload
        assert b"binary-marker" not in stored.payload
        plain = make_layer(serializer_format=serializer)
        await plain.send("clear", message)
        (clear,) = await claim(driver, "clear", now=_wall_now())
        assert b"plaintext-marker" in clear.payload

    @pytest.mark.asyncio
    async def test_encryption_key_rotation(self, make_layer: MakeLayer) -> None:
        """SPEC 26: the first key encrypts, every key decrypts; an old-key-only reader
        cannot read new-key messages, which are dropped, not delivered."""
        old = make_layer(symmetric_encryption_keys=["old-key"])
        rotated = make_layer(symmetric_encryption_keys=["new-key", "old-key"])
        await old.send("c", {"from": "old"})
        assert await recv(rotated, "c") == {"from": "old"}
        await rotated.send("c", {"from": "rotated"})
        await old.send("c", {"from": "old-again"})
        assert await recv(old, "c") == {"from": "old-again"}
        await assert_next_is_sentinel(old, "c")

    @pytest.mark.asyncio
    async def test_wrong_key_rejected_and_not_delivered(
        self, make_layer: MakeLayer, caplog: pytest.LogCaptureFixture
    ) -> None:
        """SPEC 26, 7: a message encrypted with another key, or not encrypted at all, is
        never delivered to an encrypting layer; the reader moves on to the next message."""
        caplog.set_level(logging.WARNING)
        alpha = make_layer(symmetric_encryption_keys=["alpha"])
        beta = make_layer(symmetric_encryption_keys=["beta"])
        plain = make_layer()
        await alpha.send("c", {"secret": "for-alpha"})
        await plain.send("c", {"secret": "unencrypted"})
        await beta.send("c", {"secret": "for-beta"})
        assert await recv(beta, "c") == {"secret": "for-beta"}
        assert any(r.levelno >= logging.WARNING for r in caplog.records)
        channel = await alpha.new_channel()
        await beta.send(channel, {"secret": "wrong"})
        await alpha.send(channel, {"secret": "right"})
        assert await recv(alpha, channel) == {"secret": "right"}
        await assert_next_is_sentinel(alpha, channel)

    @pytest.mark.asyncio
    async def test_unencrypted_reader_rejects_encrypted(self, make_layer: MakeLayer) -> None:
        """SPEC 26, 7: a layer without keys does not deliver encrypted payloads as garbage."""
        encrypted = make_layer(symmetric_encryption_keys=["k"])
        plain = make_layer()
        await encrypted.send("c", {"secret": 1})
        await plain.send("c", {"plain": 2})
        assert await recv(plain, "c") == {"plain": 2}


def _wall_now() -> float:
    """The real time: what a layer without a ``clock`` option stamps messages with."""
    return time.time()
