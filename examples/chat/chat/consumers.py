"""The chat WebSocket: rooms are groups, and presence travels through the layer too.

Presence needs no storage. On connect a consumer joins the room's group and group_sends
``presence.join``; every member already there shows the newcomer and answers it directly
(``channel_layer.send`` to its channel) with ``presence.here``. On disconnect it group_sends
``presence.leave``. Every event names the worker process (pid) that handled it, so the page shows
messages crossing from one worker to another through channels-lite.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from typing import Any
from urllib.parse import parse_qs

from channels.generic.websocket import AsyncWebsocketConsumer

from .rooms import MAX_TEXT, clean_name, group_name, is_valid_room, message_event

logger = logging.getLogger("chat")


class ChatConsumer(AsyncWebsocketConsumer):
    group = ""
    member: dict[str, Any]

    async def connect(self) -> None:
        room = self.scope["url_route"]["kwargs"]["room"]
        if not is_valid_room(room):
            await self.close()
            return
        query = parse_qs(self.scope.get("query_string", b"").decode("latin-1"))
        self.room = room
        self.member = {
            "id": secrets.token_hex(4),
            "name": clean_name(query.get("name", [""])[0]),
            "pid": os.getpid(),
        }
        await self.channel_layer.group_add(group_name(room), self.channel_name)
        self.group = group_name(room)
        await self.accept()
        await self.send_event("welcome", room=room, you=self.member, pid=os.getpid())
        await self.channel_layer.group_send(
            self.group,
            {"type": "presence.join", "member": self.member, "reply_to": self.channel_name},
        )

    async def disconnect(self, code: int) -> None:
        if not self.group:
            return
        group, self.group = self.group, ""
        await self.channel_layer.group_discard(group, self.channel_name)
        await self.channel_layer.group_send(
            group, {"type": "presence.leave", "member": self.member}
        )

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        try:
            data = json.loads(text_data or "")
        except ValueError:
            return
        text = str(data.get("text", "")).strip() if isinstance(data, dict) else ""
        if not text or not self.group:
            return
        event = message_event(
            self.member["name"], text[:MAX_TEXT], via="websocket", member_id=self.member["id"]
        )
        await self.channel_layer.group_send(self.group, event)

    # -- events from the layer ------------------------------------------------------------

    async def chat_message(self, event: dict[str, Any]) -> None:
        fields = {k: v for k, v in event.items() if k != "type"}
        await self.send_event("message", **fields, relayed_by=os.getpid())

    async def presence_join(self, event: dict[str, Any]) -> None:
        member = event["member"]
        if member["id"] == self.member["id"]:
            return
        await self.send_event("join", member=member)
        await self.channel_layer.send(
            event["reply_to"], {"type": "presence.here", "member": self.member}
        )

    async def presence_here(self, event: dict[str, Any]) -> None:
        await self.send_event("here", member=event["member"])

    async def presence_leave(self, event: dict[str, Any]) -> None:
        await self.send_event("leave", member=event["member"])

    async def send_event(self, kind: str, **fields: Any) -> None:
        try:
            await self.send(text_data=json.dumps({"type": kind, **fields}))
        except OSError as exc:
            # The browser is going away while an event for it was on its way. ASGI servers
            # raise an OSError for a send to a closed socket (uvicorn: ClientDisconnected);
            # left to propagate, it ends this consumer without disconnect() ever running,
            # so the room would never hear it left and its membership would linger until
            # group_expiry. The websocket.disconnect that follows runs disconnect() instead.
            logger.debug("dropped a %r event for a closing socket: %s", kind, exc)
