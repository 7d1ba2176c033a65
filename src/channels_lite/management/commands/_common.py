"""What the ``channels_lite`` and ``clean_channels`` management commands share."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError

from ... import maintenance


def entry_for(alias: str) -> maintenance.LayerEntry:
    """The CHANNEL_LAYERS entry of the running project's settings."""
    try:
        return maintenance.load_entry(None, alias)
    except maintenance.MaintenanceError as exc:
        raise CommandError(str(exc)) from exc


def writers(command: BaseCommand) -> dict[str, Any]:
    return {"out": command.stdout.write, "err": command.stderr.write}


def finish(code: int, what: str) -> None:
    """Turn a non-zero status into a CommandError (the message was already written)."""
    if code:
        raise CommandError(f"channels_lite {what} failed (status {code})", returncode=code)
