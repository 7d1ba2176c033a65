"""Custom serializers: ``channels_lite.register_serializer(name, factory)`` makes
``CONFIG["serializer_format"] = name`` available (core/codec.py; README **Configuration**,
docs/migrating.md). ``factory()`` is called once per layer and returns an object with
``dumps(message) -> bytes`` and ``loads(data) -> dict``. Registering a taken name replaces it.
"""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import pytest
from channels.exceptions import InvalidChannelLayerError

from channels_lite import ChannelLayer, ConfigurationError, register_serializer
from channels_lite.core import codec

GUARD = 10.0
TAG = b"tagged-json:"


class TaggedJSON:
    """JSON behind a recognisable prefix, so the stored bytes show which serializer wrote them;
    refuses (ValueError, as a serializer does) any message with a ``"refuse"`` key."""

    def __init__(self, tag: bytes = TAG) -> None:
        self.tag = tag

    def dumps(self, message: dict[str, Any]) -> bytes:
        if "refuse" in message:
            raise ValueError("this serializer refuses messages with a 'refuse' key")
        return self.tag + json.dumps(message).encode()

    def loads(self, data: bytes) -> dict[str, Any]:
        if not data.startswith(self.tag):
            raise ValueError(f"not written by this serializer: {data[:20]!r}")
        result: dict[str, Any] = json.loads(data[len(self.tag) :])
        return result


@pytest.fixture(autouse=True)
def registry(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Each test registers into its own copy of the registry (msgpack and json only)."""
    copy = dict(codec._SERIALIZERS)
    monkeypatch.setattr(codec, "_SERIALIZERS", copy)
    return copy


def _payloads(path: Path) -> list[bytes]:
    conn = sqlite3.connect(path)
    try:
        return [row[0] for row in conn.execute("SELECT payload FROM channels_lite_messages")]
    finally:
        conn.close()


async def test_registered_serializer_chosen_through_config_round_trips(tmp_path: Path) -> None:
    """Its name in CONFIG selects it: what is stored is its bytes, and every layer on the
    storage configured with it reads them back, for send and group_send."""
    calls: list[str] = []

    def factory() -> TaggedJSON:
        calls.append("made")
        return TaggedJSON()

    register_serializer("tagged-json", factory)
    path = tmp_path / "db.sqlite3"
    config: dict[str, Any] = {"path": str(path), "serializer_format": "tagged-json"}
    sender, reader = ChannelLayer(**config), ChannelLayer(**config)
    assert calls == ["made", "made"]  # once per layer, when it is built
    message = {"type": "chat.message", "text": "héllo", "n": [1, 2.5, None, True]}
    try:
        await sender.send("room", message)
        (stored,) = _payloads(path)
        assert stored.startswith(TAG)
        assert json.loads(stored[len(TAG) :]) == message
        assert await asyncio.wait_for(reader.receive("room"), GUARD) == message
        await sender.group_add("g", "member")
        await sender.group_send("g", {"type": "to.group"})
        assert await asyncio.wait_for(reader.receive("member"), GUARD) == {"type": "to.group"}
        # Its own channels (no storage on the way) go through it too.
        mine = await reader.new_channel()
        await reader.send(mine, message)
        assert await asyncio.wait_for(reader.receive(mine), GUARD) == message
    finally:
        await sender.close()
        await reader.close()


async def test_registered_serializer_refusing_a_message_stores_nothing() -> None:
    """A ValueError or TypeError from its ``dumps`` is the send's TypeError (as for the built-in
    serializers), naming the reason, and nothing is stored."""
    register_serializer("tagged-json", TaggedJSON)
    layer = ChannelLayer(driver="memory", serializer_format="tagged-json")
    try:
        with pytest.raises(TypeError, match="refuses messages with a 'refuse' key"):
            await layer.send("c", {"refuse": True})
        await layer.send("c", {"type": "sentinel"})
        assert await asyncio.wait_for(layer.receive("c"), GUARD) == {"type": "sentinel"}
    finally:
        await layer.close()


async def test_registering_a_taken_name_replaces_it() -> None:
    """Layers built after a new registration under the same name use the new serializer;
    one built before keeps the serializer it was built with."""
    store = f"test-serializers-{uuid.uuid4().hex}"
    register_serializer("tagged-json", lambda: TaggedJSON(b"v1:"))
    before = ChannelLayer(driver="memory", store=store, serializer_format="tagged-json")
    register_serializer("tagged-json", lambda: TaggedJSON(b"v2:"))
    after = ChannelLayer(driver="memory", store=store, serializer_format="tagged-json")
    try:
        assert after._codec.encode({"n": 1}).startswith(b"v2:")
        assert before._codec.encode({"n": 1}).startswith(b"v1:")
        # A v1 payload is not a v2 one: the reader drops it (logged), then gets the next.
        await before.send("c", {"from": "v1"})
        await after.send("c", {"from": "v2"})
        assert await asyncio.wait_for(after.receive("c"), GUARD) == {"from": "v2"}
    finally:
        await before.close()
        await after.close()


def test_registered_name_is_listed_by_the_configuration_error() -> None:
    """An unknown name is a ConfigurationError (an InvalidChannelLayerError) at construction
    naming the key and the value and listing every known serializer, the registered ones
    included; a registered name is accepted."""
    register_serializer("tagged-json", TaggedJSON)
    with pytest.raises(ConfigurationError) as info:
        ChannelLayer(driver="memory", serializer_format="taged-json")
    assert isinstance(info.value, InvalidChannelLayerError)
    assert info.value.key == "serializer_format"
    text = str(info.value)
    assert "serializer_format" in text
    assert "'taged-json'" in text
    assert "json, msgpack, tagged-json" in text
    ChannelLayer(driver="memory", serializer_format="tagged-json")


@pytest.mark.parametrize("value", ["xml", "", 5, None, b"json"])
def test_unknown_serializer_names_the_key_and_value_and_lists_known(value: object) -> None:
    with pytest.raises(ConfigurationError) as info:
        ChannelLayer(driver="memory", serializer_format=value)
    assert info.value.key == "serializer_format"
    text = str(info.value)
    assert f"CONFIG['serializer_format'] is {value!r}" in text
    assert "json, msgpack" in text


def test_unknown_serializer_error_does_not_list_unregistered_names() -> None:
    """The list is the registry's: a name is only offered once registered."""
    with pytest.raises(ConfigurationError) as info:
        ChannelLayer(driver="memory", serializer_format="tagged-json")
    assert "choose one of json, msgpack " in str(info.value)


# -- registering something that is not a serializer -------------------------------------------
#
# register_serializer() refuses a name that is not a non-empty str and a factory that is not
# callable; a layer refuses a serializer_format whose factory makes no serializer.


@pytest.mark.parametrize("name", [5, "", None, b"json"])
def test_a_name_that_is_not_a_non_empty_str_is_refused_and_breaks_nothing(name: object) -> None:
    with pytest.raises(TypeError, match=re.escape(repr(name))):
        register_serializer(name, TaggedJSON)  # type: ignore[arg-type]
    ChannelLayer(driver="memory")


def test_a_factory_that_is_not_callable_is_refused_when_registered() -> None:
    with pytest.raises(TypeError, match="tagged-json"):
        register_serializer("tagged-json", 42)  # type: ignore[arg-type]


async def test_a_factory_making_no_serializer_is_refused_when_the_layer_is_built() -> None:
    register_serializer("tagged-json", object)
    try:
        layer = ChannelLayer(driver="memory", serializer_format="tagged-json")
    except ConfigurationError as exc:
        assert exc.key == "serializer_format"
        return
    try:
        await layer.send("c", {"n": 1})
    finally:
        await layer.close()
    pytest.fail("a serializer without dumps() was accepted")


class _Name(str):
    pass


@pytest.mark.parametrize("serializer", ["msgpack", "json"])
async def test_subclasses_of_carried_types_take_the_full_check_and_arrive(
    serializer: str,
) -> None:
    """Messages of exact types pass a quick walk; subclasses (an OrderedDict, a str or int
    subclass, nested anywhere) go through the full check, which accepts them."""
    from collections import OrderedDict

    layer = ChannelLayer(driver="memory", serializer_format=serializer)
    message = {"type": "x", "nested": [OrderedDict(a=_Name("b")), (1, True), {"n": None}]}
    assert codec._plain({"type": "x", "nested": [{"a": "b"}, (1, 2.5, b"x"), None]})
    assert not codec._plain(message)
    try:
        await layer.send("c", message)
        got = await asyncio.wait_for(layer.receive("c"), 5)
    finally:
        await layer.close()
    assert got["nested"][0] == {"a": "b"} and got["nested"][2] == {"n": None}


def test_a_non_str_key_deep_in_a_message_is_named_with_its_path() -> None:
    with pytest.raises(TypeError, match=r"message\['outer'\]\[0\] has a key of type int"):
        codec.check_message({"type": "x", "outer": [{1: "one"}]})
