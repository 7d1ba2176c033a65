"""Room names, member names and the events that travel through the channel layer.

The consumer and the ``post`` management command build their messages here, so a message
posted from sync code looks exactly like one typed in a browser.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from typing import Any

# Lower-case letters, digits, "-" and "_": always a valid Channels group name once prefixed.
ROOM_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")
MAX_NAME = 24
MAX_TEXT = 1000


def is_valid_room(room: str) -> bool:
    return bool(ROOM_RE.match(room))


def group_name(room: str) -> str:
    """The Channels group of a room; every connection in the room is a member."""
    return f"chat.{room}"


def clean_name(name: str | None) -> str:
    name = " ".join((name or "").split())[:MAX_NAME]
    return name or "guest"


def message_event(
    name: str, text: str, *, via: str, member_id: str | None = None
) -> dict[str, Any]:
    """A ``chat.message`` event for ``group_send``; handled by ``ChatConsumer.chat_message``."""
    return {
        "type": "chat.message",
        "id": uuid.uuid4().hex,
        "name": clean_name(name),
        "member_id": member_id,
        "text": text[:MAX_TEXT],
        "sent_at": time.time(),
        "origin_pid": os.getpid(),
        "via": via,
    }
