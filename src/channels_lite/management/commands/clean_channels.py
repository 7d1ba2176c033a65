"""``manage.py clean_channels``: channels-lite 0.4's maintenance command, kept working.

It is ``manage.py channels_lite purge --vacuum``: expired messages and memberships are deleted,
then (SQLite only) the file is checkpointed and vacuumed, unless ``--no-vacuum`` is given, as in
0.4. Prefer ``manage.py channels_lite purge`` in new scripts.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from ...cli import add_layer_arguments, run_purge
from ._common import entry_for, finish, writers


class Command(BaseCommand):  # type: ignore[misc]
    help = (
        "Delete expired channel messages and group memberships, then VACUUM the SQLite file "
        "(channels-lite 0.4 name of 'channels_lite purge --vacuum')."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--no-vacuum",
            action="store_true",
            help="only delete expired data; skip the checkpoint and VACUUM",
        )
        add_layer_arguments(parser, config=False)

    def handle(self, *args: Any, **options: Any) -> None:
        entry = entry_for(options["alias"])
        code = run_purge(entry, vacuum=not options["no_vacuum"], as_json=False, **writers(self))
        finish(code, "clean_channels")
