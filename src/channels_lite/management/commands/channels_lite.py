"""``manage.py channels_lite stats|purge``: the operator commands, on the project's settings.

The same as ``channels-lite stats`` and ``channels-lite purge`` with ``--config`` set to the
project's settings module.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from ...cli import (
    add_layer_arguments,
    add_purge_arguments,
    add_stats_arguments,
    run_purge,
    run_stats,
)
from ._common import entry_for, finish, writers


class Command(BaseCommand):  # type: ignore[misc]
    help = (
        "channels-lite operator commands: 'stats' shows what the layer's storage holds, "
        "'purge' deletes expired data (--vacuum: also compact a SQLite file)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        actions = parser.add_subparsers(dest="action", metavar="{stats,purge}")
        actions.required = True
        stats = actions.add_parser(
            "stats", help="pending messages per channel, groups, processes, expired rows, size"
        )
        add_layer_arguments(stats, config=False)
        add_stats_arguments(stats)
        purge = actions.add_parser(
            "purge", help="delete expired messages and memberships (--vacuum for SQLite)"
        )
        add_layer_arguments(purge, config=False)
        add_purge_arguments(purge)

    def handle(self, *args: Any, **options: Any) -> None:
        entry = entry_for(options["alias"])
        action = options["action"]
        if action == "stats":
            code = run_stats(entry, top=options["top"], as_json=options["json"], **writers(self))
        else:
            code = run_purge(
                entry, vacuum=options["vacuum"], as_json=options["json"], **writers(self)
            )
        finish(code, action)
