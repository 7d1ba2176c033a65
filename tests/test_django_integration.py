"""channels-lite behind a real Django Channels consumer, with the zero-configuration layer.

``CHANNEL_LAYERS = {"default": {"BACKEND": "channels_lite.ChannelLayer"}}`` and nothing else:
the layer must use SQLite at ``settings.BASE_DIR / "channels-lite.sqlite3"``.

Django settings are process-global and a pytest-xdist worker may run other modules before or
after this one. So: configure only if nobody did (and undo that afterwards), and apply this
module's settings per test with ``override_settings``, whose ``setting_changed`` signal also
makes Channels drop its cached layer, so every test gets a fresh layer on its own file.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import json
import os
import stat
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from channels.generic.websocket import AsyncWebsocketConsumer
from channels.layers import get_channel_layer
from django.conf import settings
from django.test import override_settings
from django.utils.functional import empty

from channels_lite import ChannelLayer
from channels_lite.drivers.sqlite import SQLiteDriver


def _websocket_communicator() -> Any:
    """channels' own ``WebsocketCommunicator``, also when daphne is not installed.

    ``channels/testing/__init__.py`` imports its live-server test case, which needs daphne
    (``channels[daphne]``); the communicators do not. Without daphne, register the package
    without running its ``__init__`` and import the communicator modules themselves.
    Adding ``daphne`` to the dev dependencies makes this fallback unused.
    """
    try:
        from channels.testing import WebsocketCommunicator
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.partition(".")[0] != "daphne":
            raise
    else:
        return WebsocketCommunicator
    if "channels.testing" not in sys.modules:
        import channels

        directory = os.path.join(os.path.dirname(channels.__file__), "testing")
        spec = importlib.util.spec_from_file_location(
            "channels.testing",
            os.path.join(directory, "__init__.py"),
            submodule_search_locations=[directory],
        )
        assert spec is not None
        package = importlib.util.module_from_spec(spec)
        sys.modules["channels.testing"] = package
        # What the real __init__ exports, minus the live-server test case.
        for module, name in (
            ("application", "ApplicationCommunicator"),
            ("http", "HttpCommunicator"),
            ("websocket", "WebsocketCommunicator"),
        ):
            setattr(package, name, getattr(importlib.import_module(f"{spec.name}.{module}"), name))
    return sys.modules["channels.testing"].WebsocketCommunicator


WebsocketCommunicator = _websocket_communicator()

ROOM = "room"
#: Failure guard only.
GUARD = 10.0
LAYERS = {"default": {"BACKEND": "channels_lite.ChannelLayer"}}


class RoomConsumer(AsyncWebsocketConsumer):  # type: ignore[misc]
    """Joins ``ROOM`` on connect; whatever a client sends is broadcast to the whole room."""

    async def connect(self) -> None:
        await self.channel_layer.group_add(ROOM, self.channel_name)
        await self.accept()

    async def disconnect(self, code: int) -> None:
        await self.channel_layer.group_discard(ROOM, self.channel_name)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        await self.channel_layer.group_send(ROOM, {"type": "room.message", "text": text_data})

    async def room_message(self, event: dict[str, Any]) -> None:
        await self.send(text_data=event["text"])


@pytest.fixture(scope="module", autouse=True)
def django_settings() -> Iterator[None]:
    configured_here = not settings.configured
    if configured_here:
        settings.configure(SECRET_KEY="channels-lite-tests", INSTALLED_APPS=[], USE_TZ=True)
    try:
        yield
    finally:
        if configured_here:
            # Leave the process as we found it, so a later module may configure its own.
            settings._wrapped = empty


@pytest.fixture
async def layer(tmp_path: Path) -> AsyncIterator[ChannelLayer]:
    with override_settings(BASE_DIR=tmp_path, CHANNEL_LAYERS=LAYERS):
        channel_layer = get_channel_layer()
        assert isinstance(channel_layer, ChannelLayer)
        try:
            yield channel_layer
        finally:
            await channel_layer.close()


async def connected() -> Any:
    communicator = WebsocketCommunicator(RoomConsumer.as_asgi(), "/ws/room/")
    ok, _ = await communicator.connect(timeout=GUARD)
    assert ok
    return communicator


async def member_count(path: Path, group: str) -> int:
    """Read the group table through a second driver instance (what another process sees)."""
    driver = SQLiteDriver(path=path)
    await driver.open()
    try:
        stats = await driver.stats(time.time(), 100)
    finally:
        await driver.close()
    return stats.groups.get(group, 0)


async def test_group_broadcast_reaches_both_communicators(layer: ChannelLayer) -> None:
    first, second = await connected(), await connected()
    try:
        await first.send_to(text_data="hello")
        assert await first.receive_from(timeout=GUARD) == "hello"
        assert await second.receive_from(timeout=GUARD) == "hello"
        await second.send_to(text_data="back")
        assert await first.receive_from(timeout=GUARD) == "back"
        assert await second.receive_from(timeout=GUARD) == "back"
        assert await first.receive_nothing()
        assert await second.receive_nothing()
    finally:
        await first.disconnect()
        await second.disconnect()


async def test_disconnect_leaves_group_and_frees_receiver(
    layer: ChannelLayer, tmp_path: Path
) -> None:
    database = tmp_path / "channels-lite.sqlite3"
    first, second = await connected(), await connected()
    assert await member_count(database, ROOM) == 2

    # Disconnecting cancels the consumer's pending receive(): it must end cleanly.
    await second.disconnect(timeout=GUARD)
    assert await member_count(database, ROOM) == 1
    await first.send_to(text_data="after")
    assert await first.receive_from(timeout=GUARD) == "after"

    # A new connection joins and the room keeps working.
    third = await connected()
    try:
        await third.send_to(text_data="again")
        assert await first.receive_from(timeout=GUARD) == "again"
        assert await third.receive_from(timeout=GUARD) == "again"
    finally:
        await third.disconnect(timeout=GUARD)
        await first.disconnect(timeout=GUARD)
    assert await member_count(database, ROOM) == 0
    state = layer.local_state()
    assert state["waiting_channels"] == 0
    assert state["buffered_channels"] == 0


async def test_sync_group_send_from_a_thread(layer: ChannelLayer) -> None:
    communicator = await connected()
    errors: list[BaseException] = []

    def sync_code() -> None:
        # What a sync view, a management command or a Celery task does.
        try:
            async_to_sync(get_channel_layer().group_send)(
                ROOM, {"type": "room.message", "text": "from sync code"}
            )
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=sync_code, name="sync-sender")
    thread.start()
    try:
        assert await communicator.receive_from(timeout=GUARD) == "from sync code"
    finally:
        thread.join(GUARD)
        await communicator.disconnect()
    assert not thread.is_alive()
    assert errors == []
    # async_to_sync's loop is closed: its driver instance went with it.
    assert layer.local_state()["loops"] == 1


async def test_default_database_file_location_and_mode(layer: ChannelLayer, tmp_path: Path) -> None:
    database = tmp_path / "channels-lite.sqlite3"
    communicator = await connected()  # the first layer call opens storage
    try:
        assert database.is_file()
        assert str(database) in repr(layer)
        assert stat.S_IMODE(database.stat().st_mode) == 0o600
        for suffix in ("-wal", "-shm"):
            companion = Path(f"{database}{suffix}")
            if companion.exists():
                assert stat.S_IMODE(companion.stat().st_mode) == 0o600, companion
    finally:
        await communicator.disconnect()


def _example_chat() -> tuple[Any, Any]:
    """The example chat's consumer class and room-to-group function (examples/chat is a
    project directory, not an installed package)."""
    root = str(Path(__file__).resolve().parent.parent / "examples" / "chat")
    if root not in sys.path:
        sys.path.insert(0, root)
    consumers = importlib.import_module("chat.consumers")
    rooms = importlib.import_module("chat.rooms")
    return consumers.ChatConsumer, rooms.group_name


async def test_chat_consumer_says_leave_after_a_send_to_its_closing_socket(
    layer: ChannelLayer,
) -> None:
    """The example chat's consumer: an event that reaches a socket already closing (the
    server's send raises an OSError, as uvicorn's ClientDisconnected does) must not end the
    consumer before disconnect() runs; the room still hears that it left. (Found by the
    end-to-end test, where such a consumer vanished without a leave.)"""
    consumer, group_name = _example_chat()
    group = group_name("lobby")
    watcher = await layer.new_channel()
    await layer.group_add(group, watcher)
    incoming: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    outgoing: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    closing = False

    async def send(message: dict[str, Any]) -> None:
        if closing and message["type"] == "websocket.send":
            raise OSError("the client disconnected")
        await outgoing.put(message)

    scope = {
        "type": "websocket",
        "path": "/ws/chat/lobby/",
        "query_string": b"name=ann",
        "headers": [],
        "url_route": {"args": (), "kwargs": {"room": "lobby"}},
    }
    app = asyncio.ensure_future(consumer.as_asgi()(scope, incoming.get, send))

    async def next_on_watcher(kind: str) -> dict[str, Any]:
        while True:
            message = await layer.receive(watcher)
            if message["type"] == kind:
                return message

    try:
        async with asyncio.timeout(GUARD):
            await incoming.put({"type": "websocket.connect"})
            assert (await outgoing.get())["type"] == "websocket.accept"
            me = json.loads((await outgoing.get())["text"])["you"]
            await next_on_watcher("presence.join")  # its own arrival
            closing = True
            other = {"id": "other", "name": "bob", "pid": 0}
            await layer.group_send(
                group, {"type": "presence.join", "member": other, "reply_to": watcher}
            )
            # Its send of "join" to the socket failed; it went on and answered anyway.
            here = await next_on_watcher("presence.here")
            assert here["member"] == me
            await incoming.put({"type": "websocket.disconnect", "code": 1001})
            left = await next_on_watcher("presence.leave")
            assert left["member"] == me
            await app  # ended cleanly, not with the OSError
    finally:
        app.cancel()
        await asyncio.gather(app, return_exceptions=True)
