"""The ASGI application: every websocket joins group ``room`` and echoes the room's messages.

The first message a client gets is ``{"pid": ..., "channel": ...}``, so the test knows which
worker process serves it. Every text frame a client sends is group-sent to ``room``, and every
member, in whichever worker, forwards it as ``{"text": ..., "from_pid": ..., "pid": ...}``,
except ``__block__:<seconds>``, which stalls the serving worker (a test hook).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "twoworkers_app.settings")
django.setup(set_prefix=False)

from channels.generic.websocket import AsyncWebsocketConsumer  # noqa: E402
from channels.routing import ProtocolTypeRouter  # noqa: E402

from twoworkers_app.protocol import BLOCK  # noqa: E402

ROOM = "room"


class RoomConsumer(AsyncWebsocketConsumer):  # type: ignore[misc]
    async def connect(self) -> None:
        await self.channel_layer.group_add(ROOM, self.channel_name)
        await self.accept()
        await self.send(text_data=json.dumps({"pid": os.getpid(), "channel": self.channel_name}))

    async def disconnect(self, code: int) -> None:
        await self.channel_layer.group_discard(ROOM, self.channel_name)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if text_data is not None and text_data.startswith(BLOCK):
            # Stall this worker's event loop on purpose: while it cannot accept, the next
            # connection can only go to the other worker (see the test's pairing).
            time.sleep(float(text_data[len(BLOCK) :]))
            return
        await self.channel_layer.group_send(
            ROOM, {"type": "room.message", "text": text_data, "from_pid": os.getpid()}
        )

    async def room_message(self, event: dict[str, Any]) -> None:
        await self.send(
            text_data=json.dumps(
                {"text": event["text"], "from_pid": event["from_pid"], "pid": os.getpid()}
            )
        )


application = ProtocolTypeRouter({"websocket": RoomConsumer.as_asgi()})
