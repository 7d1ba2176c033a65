"""``manage.py post ROOM TEXT``: post into a room from plain sync code.

Any sync Django code (a view, a Celery task, a cron job) can do the same: ``async_to_sync`` around
the layer's ``group_send``. The message goes through the same SQLite file as the server's, so
every browser in the room sees it, whichever worker process it is connected to.
"""

from __future__ import annotations

import os
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.core.management.base import BaseCommand, CommandError, CommandParser

from chat.rooms import group_name, is_valid_room, message_event


class Command(BaseCommand):
    help = "Post a message into a chat room through the channel layer."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("room", help="room name, e.g. lobby")
        parser.add_argument("text", help="the message")
        parser.add_argument("--name", default="manage.py", help="author shown in the room")

    def handle(self, *args: Any, room: str, text: str, name: str, **options: Any) -> None:
        if not is_valid_room(room):
            raise CommandError(f"invalid room name {room!r}")
        if not text.strip():
            raise CommandError("the message is empty")
        channel_layer = get_channel_layer()
        async_to_sync(channel_layer.group_send)(
            group_name(room), message_event(name, text.strip(), via="manage.py post")
        )
        self.stdout.write(f"posted to room {room!r} from pid {os.getpid()} via {channel_layer!r}")
