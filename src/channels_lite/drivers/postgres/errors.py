"""Turning psycopg failures into DriverError messages that name the server and what to do."""

from __future__ import annotations

import psycopg
from psycopg import errors as pg_errors

from channels_lite.drivers.base import DriverError
from channels_lite.drivers.postgres.options import Target

__all__ = [
    "ConnectionWaitTimeout",
    "NotApplied",
    "connection_lost",
    "retryable_server_error",
    "storage_error",
]


class ConnectionWaitTimeout(Exception):
    """Every pooled connection stayed busy until the timeout."""


class NotApplied(psycopg.OperationalError):
    """A write lost its connection before the server answered: it did not commit.

    A backend ends a session (server restart or shutdown, ``pg_terminate_backend``, idle
    timeouts) either between commands, or by aborting the command it runs; and it sends a
    command's answer, ReadyForQuery included, right after committing it, before it looks at
    the termination request. So a write whose connection died before the answer arrived was
    rolled back, and it can run again on a fresh connection without storing anything twice.
    Only a hard crash of the server (SIGKILL, power loss) landing between the commit and the
    answer could make that replay store a message twice; no client can tell that case apart.
    """


#: The server rolled the transaction back and says trying again may work.
_TRANSIENT_SQLSTATES = frozenset(
    {
        "40001",  # serialization_failure
        "40P01",  # deadlock_detected (our locks are ordered; other sessions' may not be)
        "55P03",  # lock_not_available
        "57P01",  # admin_shutdown: the server is restarting
        "57P02",  # crash_shutdown
        "57P03",  # cannot_connect_now: the server is starting up
    }
)


def retryable_server_error(exc: BaseException) -> bool:
    """The server reported a transient failure and rolled back: safe to run again."""
    return isinstance(exc, psycopg.Error) and exc.sqlstate in _TRANSIENT_SQLSTATES


def connection_lost(exc: BaseException, conn: psycopg.AsyncConnection[object] | None) -> bool:
    """The connection died under us (server restart, network), not the statement."""
    if isinstance(exc, ConnectionWaitTimeout):
        return False
    if conn is not None and (conn.broken or conn.closed):
        return True
    return isinstance(exc, psycopg.OperationalError) and exc.sqlstate in (
        None,
        "57P01",
        "57P02",
        "08000",
        "08003",
        "08006",
    )


def _hint(exc: BaseException, target: Target) -> str:
    text = str(exc).lower()
    sqlstate = exc.sqlstate if isinstance(exc, psycopg.Error) else None
    if isinstance(exc, ConnectionWaitTimeout):
        return (
            "every pooled connection stayed busy: raise CONFIG['pool_max'] (or "
            "CONFIG['timeout']), or look for slow statements on the server"
        )
    if sqlstate in ("28P01", "28000") or "password authentication failed" in text:
        return f"check the user and password in {target.source}"
    if sqlstate == "3D000" or ("database" in text and "does not exist" in text):
        return f"create the database {target.dbname!r}, or fix the database name in {target.source}"
    if sqlstate == "42501" or "permission denied" in text:
        return (
            f"grant the user {target.user or '(default)'!r} USAGE and CREATE on the schema "
            "(the driver creates its tables there), or point CONFIG['schema'] at a schema it "
            "may use"
        )
    if sqlstate == "53300" or "too many clients" in text or "too many connections" in text:
        return (
            "the server has no connection slots left: lower CONFIG['pool_max'] or raise the "
            "server's max_connections"
        )
    if sqlstate == "53200" or "out of shared memory" in text:
        return "the server ran out of shared memory; raise its max_locks_per_transaction"
    if sqlstate == "53100":
        return "the server's disk is full; free some space"
    if sqlstate in ("25006", "42P01", "3F000"):
        if sqlstate == "25006":
            return "the server is read-only (a standby?): point the DSN at the primary"
        return (
            "the channels-lite tables or schema disappeared while this process was running; "
            "restart it to recreate them"
        )
    if sqlstate in ("57P01", "57P02", "57P03"):
        return "the server is restarting; if this persists, check the server's log"
    if isinstance(exc, psycopg.OperationalError):
        return (
            f"check that PostgreSQL is running and accepts connections at {target.host}:"
            f"{target.port}, and the settings in {target.source}"
        )
    return "see the cause below"


def storage_error(exc: BaseException, target: Target, doing: str) -> DriverError:
    """A DriverError naming the server (never the password) and the likely remedy."""
    # libpq's messages span lines ("connection to server ... failed:\n\tIs the server running
    # ..."); they never contain the password.
    detail = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, pg_errors.Error) and exc.sqlstate:
        detail = f"{detail} [SQLSTATE {exc.sqlstate}]"
    return DriverError(
        f"PostgreSQL at {target.where()} failed while {doing}: {detail}; {_hint(exc, target)}"
    )
