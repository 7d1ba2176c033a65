"""Channel and group names: validation, routing keys, and new process-specific names.

The rule chosen where the Channels spec leaves a choice: a name is 1 to 100 ASCII characters
(``MAX_NAME_LENGTH``), letters, digits, ``-``, ``_`` and ``.``; a channel name may hold one ``!``
(process-specific). Channels' base class accepts 99 characters and lets a trailing newline
through; the spec asks for "at least 100", so 100 is accepted and 101 refused.
"""

from __future__ import annotations

import re
import secrets

MAX_NAME_LENGTH = 100

# fullmatch + \Z-free patterns: a trailing "\n" can never slip through (re's "$" allows it).
_CHANNEL = re.compile(r"[A-Za-z0-9_.\-]+(?:![A-Za-z0-9_.\-]*)?")
_GROUP = re.compile(r"[A-Za-z0-9_.\-]+")
_PREFIX = re.compile(r"[A-Za-z0-9_.\-]+")

_RULE = f"1 to {MAX_NAME_LENGTH} ASCII letters, digits, '-', '_' or '.'"


#: Channel names checked already (every send and receive checks its channel): a set lookup
#: instead of a regular expression. Emptied when full.
_CHECKED: set[str] = set()
_CHECKED_MAX = 8192


def check_channel(name: object) -> str:
    """Return ``name`` if it is a valid channel name, else raise ``TypeError`` saying why."""
    if type(name) is str and name in _CHECKED:
        return name
    if not isinstance(name, str):
        raise TypeError(f"Channel name must be a str, not {type(name).__name__}: {name!r}")
    if len(name) > MAX_NAME_LENGTH:
        raise TypeError(
            f"Channel name {name[:40]!r}... is {len(name)} characters long; "
            f"the limit is {MAX_NAME_LENGTH}"
        )
    if _CHANNEL.fullmatch(name) is None:
        raise TypeError(
            f"Channel name {name!r} is invalid: use {_RULE}, with at most one '!' "
            "(process-specific channels)"
        )
    if type(name) is str:
        if len(_CHECKED) >= _CHECKED_MAX:
            _CHECKED.clear()
        _CHECKED.add(name)
    return name


def check_group(name: object) -> str:
    """Return ``name`` if it is a valid group name, else raise ``TypeError`` saying why."""
    if not isinstance(name, str):
        raise TypeError(f"Group name must be a str, not {type(name).__name__}: {name!r}")
    if len(name) > MAX_NAME_LENGTH:
        raise TypeError(
            f"Group name {name[:40]!r}... is {len(name)} characters long; "
            f"the limit is {MAX_NAME_LENGTH}"
        )
    if _GROUP.fullmatch(name) is None:
        raise TypeError(f"Group name {name!r} is invalid: use {_RULE} (no '!')")
    return name


def check_prefix(prefix: object) -> str:
    """Validate the ``prefix`` of ``new_channel``: a channel name without ``!``."""
    if not isinstance(prefix, str):
        raise TypeError(f"new_channel prefix must be a str, not {type(prefix).__name__}")
    if _PREFIX.fullmatch(prefix) is None:
        raise TypeError(f"new_channel prefix {prefix!r} is invalid: use {_RULE} (no '!')")
    return prefix


def is_process_specific(channel: str) -> bool:
    return "!" in channel


def routing_key(channel: str) -> str:
    """The key a message to ``channel`` is stored and claimed under.

    A normal channel is its own key. A process-specific ``"<prefix>.<client>!<local>"`` is
    keyed ``"<client>!"`` so that every channel one process made, whatever its prefix, is served
    by one claim for that process.
    """
    bang = channel.find("!")
    if bang < 0:
        return channel
    dot = channel.rfind(".", 0, bang)
    return channel[dot + 1 : bang + 1]


def new_client_id() -> str:
    """A process-unique client id; ``secrets`` so that ``random.seed()`` cannot repeat it."""
    return secrets.token_hex(8)


def new_channel_name(prefix: str, client_id: str) -> str:
    name = f"{prefix}.{client_id}!{secrets.token_hex(8)}"
    if len(name) > MAX_NAME_LENGTH:
        raise TypeError(
            f"new_channel prefix {prefix[:40]!r}... is too long: the resulting channel name "
            f"would exceed {MAX_NAME_LENGTH} characters"
        )
    return name
