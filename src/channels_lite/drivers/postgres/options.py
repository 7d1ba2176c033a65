"""Option checks and connection targets: where the server is, said without the password.

Nothing here imports psycopg at module level, so that the driver class can be registered (and
listed by ``channels-lite drivers``) on installs without the ``postgres`` extra.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from channels_lite.drivers.base import DriverConfigError, DriverError

__all__ = [
    "INSTALL_HINT",
    "Target",
    "check_database",
    "check_dsn",
    "check_identifier",
    "check_pool_sizes",
    "check_timeout",
    "django_target",
    "dsn_target",
    "require_psycopg",
]

INSTALL_HINT = "pip install 'channels-lite[postgres]'"

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: PostgreSQL truncates identifiers longer than this (NAMEDATALEN - 1).
MAX_IDENTIFIER = 63
#: The longest name derived from the table prefix (see schema.Tables).
LONGEST_SUFFIX = "messages_channel_expires"

#: Keys of a Django DATABASES entry's OPTIONS that Django consumes itself and libpq refuses.
_DJANGO_ONLY_OPTIONS = frozenset(
    {"isolation_level", "server_side_binding", "pool", "assume_role", "cursor_factory"}
)


def require_psycopg() -> None:
    """Fail with an install hint, naming the ``driver`` key, when psycopg 3 is missing."""
    try:
        import psycopg  # noqa: F401
    except ImportError as exc:
        raise DriverConfigError(
            "driver",
            f"the 'postgres' driver needs psycopg 3 ({exc}); install them with: {INSTALL_HINT}",
        ) from exc


def check_dsn(value: Any) -> str:
    if not isinstance(value, str):
        raise DriverConfigError(
            "dsn",
            f"'dsn' must be a libpq connection string or URI (str), not {type(value).__name__}",
        )
    from psycopg import ProgrammingError
    from psycopg.conninfo import conninfo_to_dict

    try:
        conninfo_to_dict(value)
    except ProgrammingError:
        # libpq's message may quote pieces of the string, password included: not shown.
        raise DriverConfigError(
            "dsn",
            "'dsn' is not a valid libpq connection string: expected a URI like "
            "'postgresql://user:password@host:5432/dbname' or key=value pairs like "
            "'host=db.example.com dbname=app user=app'",
        ) from None
    return value


def check_database(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise DriverConfigError(
            "database",
            "'database' must be the alias of a Django DATABASES entry (a non-empty str, "
            f"e.g. 'default'), not {value!r}",
        )
    return value


def check_identifier(option: str, value: Any, *, room: int = 0) -> str:
    if not isinstance(value, str) or not _IDENTIFIER.fullmatch(value):
        raise DriverConfigError(
            option,
            f"{option!r} must be an SQL identifier (a letter or _, then letters, digits or _), "
            f"not {value!r}",
        )
    if len(value) + room > MAX_IDENTIFIER:
        raise DriverConfigError(
            option,
            f"{option!r} is too long: {value!r} must be at most {MAX_IDENTIFIER - room} "
            f"characters so that every name built from it fits PostgreSQL's {MAX_IDENTIFIER}",
        )
    return value


def _size(option: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise DriverConfigError(
            option, f"{option!r} must be an int, not {type(value).__name__} ({value!r})"
        )
    if value < minimum:
        raise DriverConfigError(option, f"{option!r} must be at least {minimum}, not {value!r}")
    return value


def check_pool_sizes(pool_min: Any, pool_max: Any) -> tuple[int, int]:
    low = _size("pool_min", pool_min, 0)
    high = _size("pool_max", pool_max, 1)
    if high < low:
        raise DriverConfigError(
            "pool_max", f"'pool_max' ({high}) must not be smaller than 'pool_min' ({low})"
        )
    return low, high


def check_timeout(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DriverConfigError(
            "timeout",
            f"'timeout' must be a number of seconds, not {type(value).__name__} ({value!r})",
        )
    timeout = float(value)
    if not math.isfinite(timeout) or timeout <= 0:
        raise DriverConfigError(
            "timeout", f"'timeout' must be a positive, finite number of seconds, not {value!r}"
        )
    return timeout


@dataclass(frozen=True, slots=True)
class Target:
    """A resolved connection string, and a password-free way to name it."""

    conninfo: str
    host: str
    port: str
    dbname: str
    user: str
    #: Where the settings came from, for error messages ("CONFIG['dsn']", "DATABASES['x']").
    source: str

    def where(self) -> str:
        user = f"{self.user}@" if self.user else ""
        return f"{user}{self.host}:{self.port}/{self.dbname}"


def _target(conninfo: str, source: str, timeout: float) -> Target:
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    params = conninfo_to_dict(conninfo)
    extra: dict[str, Any] = {}
    if "application_name" not in params:
        extra["application_name"] = "channels-lite"
    if "connect_timeout" not in params:
        # libpq's own connect timeout, so that a dead host fails within our timeout.
        extra["connect_timeout"] = max(2, math.ceil(timeout))
    full = make_conninfo(conninfo, **extra) if extra else conninfo
    host = str(params.get("host") or params.get("hostaddr") or "localhost (default)")
    return Target(
        conninfo=full,
        host=host,
        port=str(params.get("port") or "5432"),
        dbname=str(params.get("dbname") or params.get("user") or "(default)"),
        user=str(params.get("user") or ""),
        source=source,
    )


def dsn_target(dsn: str, timeout: float) -> Target:
    return _target(dsn, "CONFIG['dsn']", timeout)


def django_target(alias: str, timeout: float) -> Target:
    """Connection settings of Django's ``DATABASES[alias]``, read now (at open, not import)."""
    source = f"DATABASES[{alias!r}] (CONFIG['database'])"
    try:
        from django.conf import settings
        from django.core.exceptions import ImproperlyConfigured

        try:
            databases: Mapping[str, Mapping[str, Any]] = settings.DATABASES
        except ImproperlyConfigured as exc:
            raise DriverError(
                f"the postgres driver was given CONFIG['database'] = {alias!r}, but Django "
                f"settings are not configured ({exc}); set DJANGO_SETTINGS_MODULE, or give "
                "CONFIG['dsn'] instead"
            ) from exc
    except ImportError as exc:  # pragma: no cover - Django is a dependency
        raise DriverError(
            f"CONFIG['database'] = {alias!r} needs Django; give CONFIG['dsn'] instead"
        ) from exc
    entry = databases.get(alias)
    if entry is None:
        known = ", ".join(sorted(databases)) or "none"
        raise DriverError(
            f"CONFIG['database'] = {alias!r} is not in Django's DATABASES (aliases: {known}); "
            "name one of them, or give CONFIG['dsn'] instead"
        )
    engine = str(entry.get("ENGINE", ""))
    if "postgres" not in engine and "postgis" not in engine:
        raise DriverError(
            f"DATABASES[{alias!r}] uses ENGINE {engine!r}, not PostgreSQL; point "
            "CONFIG['database'] at a PostgreSQL alias, or give CONFIG['dsn'] instead"
        )
    from psycopg import ProgrammingError
    from psycopg.conninfo import make_conninfo

    # What Django's own postgresql backend passes to psycopg (get_connection_params).
    options = dict(entry.get("OPTIONS") or {})
    params: dict[str, Any] = {
        k: v for k, v in options.items() if k not in _DJANGO_ONLY_OPTIONS and v is not None
    }
    name = entry.get("NAME")
    if name:
        params["dbname"] = name
    elif not options.get("service"):
        params["dbname"] = "postgres"
    for key, param in (("USER", "user"), ("PASSWORD", "password"), ("HOST", "host")):
        if entry.get(key):
            params[param] = entry[key]
    if entry.get("PORT"):
        params["port"] = str(entry["PORT"])
    try:
        conninfo = make_conninfo("", **params)
    except (ProgrammingError, TypeError, ValueError) as exc:
        raise DriverError(
            f"DATABASES[{alias!r}] does not make a valid PostgreSQL connection string "
            f"({type(exc).__name__}); check its HOST, PORT, NAME, USER and OPTIONS"
        ) from None
    return _target(conninfo, source, timeout)
