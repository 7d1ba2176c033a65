"""The ``channels-lite`` command: list drivers, run the conformance suite against one, and the
operator commands ``stats`` and ``purge`` (also ``manage.py channels_lite stats|purge``)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sqlite3
import sys
import tempfile
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import maintenance
from .drivers.base import DriverError
from .drivers.registry import (
    DriverLookupError,
    available_drivers,
    driver_capabilities,
    driver_distribution,
    driver_features,
    driver_origin,
    get_driver_class,
)

logger = logging.getLogger("channels_lite.cli")


def _parse_option(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--option expects key=value, got {text!r}")
    try:
        value: Any = json.loads(raw)
    except json.JSONDecodeError:
        value = raw  # a bare string such as a path
    return key, value


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


def cmd_drivers(args: argparse.Namespace) -> int:
    rows: list[dict[str, Any]] = []
    for name, cls in sorted(available_drivers().items()):
        plugin, version = driver_origin(name)
        distribution, _ = driver_distribution(name)
        features = driver_features(cls)
        rows.append(
            {
                "name": name,
                "class": f"{cls.__module__}.{cls.__qualname__}",
                "plugin": plugin,
                "version": version,
                "cross_process": features["cross_process"],
                "persistent": features["persistent"],
                "options": dict(cls.option_docs),
                "distribution": distribution,
                "features": features,
                "capabilities": driver_capabilities(cls),
            }
        )
    if args.json:
        _out(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        package = row["distribution"] or "unknown"
        _out(
            f"{row['name']}  ({row['class']}, plugin {row['plugin']}, "
            f"package {package}, version {row['version']})"
        )
        _out("    " + " ".join(f"{key}={value}" for key, value in row["features"].items()))
        _out(f"    capabilities: {', '.join(row['capabilities']) or 'none'}")
        for key, doc in row["options"].items():
            _out(f"    option {key}: {doc}")
    return 0


_TEST_TEMPLATE = """\
import json
import uuid

import pytest
from channels_lite.conformance import ConformanceTests

OPTIONS = json.loads({options!r})
NEEDS_PATH = {needs_path!r}
ISOLATE = json.loads({isolate!r})


class TestConformance(ConformanceTests):
    @pytest.fixture
    def driver_options(self, tmp_path):
        # Every test must start from empty storage: a fresh file, a fresh key/table prefix.
        unique = f"clc_{{uuid.uuid4().hex[:12]}}_"
        options = {{
            key: value.replace("{{tmp_path}}", str(tmp_path)).replace("{{unique}}", unique)
            if isinstance(value, str)
            else value
            for key, value in OPTIONS.items()
        }}
        if NEEDS_PATH and "path" not in options:
            options["path"] = str(tmp_path / "conformance.db")
        for key in ISOLATE:
            options.setdefault(key, unique)
        return options
"""

#: Driver options that name a namespace inside shared storage (``store`` is the memory
#: driver's); when a driver has one and the user did not set it, each conformance test gets a
#: fresh value (valid as an SQL identifier, a key prefix and a store name).
_ISOLATION_OPTIONS = ("prefix", "key_prefix", "table_prefix", "store")


class _Tally:
    """A pytest plugin counting outcomes, and why tests were skipped."""

    def __init__(self) -> None:
        self.counts = {"passed": 0, "failed": 0, "skipped": 0}
        self.skip_reasons: dict[str, int] = {}

    def pytest_runtest_logreport(self, report: Any) -> None:
        if report.when == "call" or (report.when == "setup" and not report.passed):
            outcome = report.outcome
            if outcome in self.counts:
                self.counts[outcome] += 1
            if report.skipped:
                reason = str(report.longrepr[2]) if isinstance(report.longrepr, tuple) else "?"
                reason = reason.removeprefix("Skipped: ")
                self.skip_reasons[reason] = self.skip_reasons.get(reason, 0) + 1


def cmd_conformance(args: argparse.Namespace) -> int:
    import pytest

    try:
        cls = get_driver_class(args.driver)
    except DriverLookupError as exc:
        _out(str(exc))
        return 2
    options: dict[str, Any] = {"driver": args.driver}
    options.update(dict(args.option or []))
    with tempfile.TemporaryDirectory(prefix="channels-lite-conformance-") as tmp:
        test_file = Path(tmp) / "test_conformance_cli.py"
        test_file.write_text(
            _TEST_TEMPLATE.format(
                options=json.dumps(options),
                needs_path="path" in cls.option_docs,
                isolate=json.dumps([key for key in _ISOLATION_OPTIONS if key in cls.option_docs]),
            )
        )
        tally = _Tally()
        pytest_args = [
            str(test_file),
            "--rootdir",
            tmp,
            "-p",
            "no:cacheprovider",
            "-o",
            "addopts=",
            "-o",
            "asyncio_mode=auto",
            "-o",
            "asyncio_default_fixture_loop_scope=function",
            *args.pytest_args,
        ]
        code = pytest.main(pytest_args, plugins=[tally])
    counts = tally.counts
    _out(
        f"conformance of driver {args.driver!r}: {counts['passed']} passed, "
        f"{counts['failed']} failed, {counts['skipped']} skipped"
    )
    for reason, count in sorted(tally.skip_reasons.items()):
        _out(f"  skipped {count}: {reason}")
    return int(code)


Writer = Callable[[str], None]


def _err(text: str) -> None:
    sys.stderr.write(text + "\n")


def run_stats(
    entry: maintenance.LayerEntry, *, top: int, as_json: bool, out: Writer, err: Writer
) -> int:
    """``stats`` for one CHANNEL_LAYERS entry; shared with ``manage.py channels_lite stats``."""
    try:
        driver = maintenance.open_driver(entry)
        report = maintenance.run(maintenance.stats(driver, top=top))
    except (maintenance.MaintenanceError, DriverError) as exc:
        err(f"channels-lite stats: {exc}")
        return 2
    report = {"alias": entry.alias, "backend": entry.backend, **report}
    if as_json:
        out(json.dumps(report, indent=2, default=str))
    else:
        out(maintenance.format_stats(report, alias=entry.alias, top=top))
    return 0 if report["supports_stats"] else maintenance.EXIT_UNSUPPORTED


def run_purge(
    entry: maintenance.LayerEntry, *, vacuum: bool, as_json: bool, out: Writer, err: Writer
) -> int:
    """``purge`` for one CHANNEL_LAYERS entry; shared with ``manage.py channels_lite purge``
    and the 0.4 ``clean_channels`` command."""
    try:
        driver = maintenance.open_driver(entry)
        removed = maintenance.run(maintenance.purge(driver))
    except (maintenance.MaintenanceError, DriverError) as exc:
        err(f"channels-lite purge: {exc}")
        return 2
    report: dict[str, Any] = {
        "alias": entry.alias,
        "driver": driver.name,
        "storage": driver.describe(),
        "removed": removed,
    }
    if not as_json:
        out(f"purged {removed} expired row(s) from {driver.describe()}")
    if vacuum:
        path = maintenance.sqlite_path(driver)
        if path is None:
            report["vacuum"] = None
            err(f"--vacuum applies to the sqlite driver only; skipped for {driver.name!r}")
        else:
            err(maintenance.VACUUM_WARNING.format(path=path))
            try:
                before, after, complete = maintenance.vacuum_sqlite(
                    path, timeout=float(getattr(driver, "timeout", 30.0))
                )
            except sqlite3.Error as exc:
                err(f"channels-lite purge: VACUUM of {path} failed: {exc}")
                return 1
            report["vacuum"] = {"before_bytes": before, "after_bytes": after}
            if not as_json:
                out(f"vacuumed {path}: {before} -> {after} bytes")
            if not complete:
                err(
                    "note: the final WAL checkpoint could not finish because another "
                    "connection is reading; the -wal file shrinks at its next checkpoint"
                )
    if as_json:
        out(json.dumps(report, indent=2))
    return 0


def _setup_logging() -> None:
    # Show the layer's WARNINGs (0.4 deprecations, storage trouble) unless the host app already
    # configured logging.
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def cmd_stats(args: argparse.Namespace) -> int:
    _setup_logging()
    try:
        entry = maintenance.load_entry(args.config, args.alias)
    except maintenance.MaintenanceError as exc:
        _err(f"channels-lite stats: {exc}")
        return 2
    return run_stats(entry, top=args.top, as_json=args.json, out=_out, err=_err)


def cmd_purge(args: argparse.Namespace) -> int:
    _setup_logging()
    try:
        entry = maintenance.load_entry(args.config, args.alias)
    except maintenance.MaintenanceError as exc:
        _err(f"channels-lite purge: {exc}")
        return 2
    return run_purge(entry, vacuum=args.vacuum, as_json=args.json, out=_out, err=_err)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1, got {value}")
    return value


def add_layer_arguments(parser: argparse.ArgumentParser, *, config: bool = True) -> None:
    """``--config`` and ``--alias``, shared by ``stats`` and ``purge``."""
    if config:
        parser.add_argument(
            "--config",
            metavar="SETTINGS_MODULE_OR_JSON",
            help="a Django settings module (its CHANNEL_LAYERS is read), or a JSON object of "
            'CONFIG keys for channels_lite.ChannelLayer (with a "BACKEND" key: a whole '
            "CHANNEL_LAYERS entry). Default: DJANGO_SETTINGS_MODULE if set, else the "
            "zero-configuration layer (./channels-lite.sqlite3)",
        )
    parser.add_argument(
        "--alias", default="default", help="CHANNEL_LAYERS alias (default: 'default')"
    )


def add_stats_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--top", type=_positive, default=10, help="channels and groups to list (default 10)"
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def add_purge_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--vacuum",
        action="store_true",
        help="SQLite only: then checkpoint the WAL and VACUUM the file (locks the database "
        "while it runs)",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="channels-lite",
        description="channels-lite: list storage drivers, check one against the driver "
        "contract, and inspect or purge a channel layer's storage.",
    )
    # Each command's help fits on its line of an 80-column --help.
    sub = parser.add_subparsers(dest="command", required=True, title="commands")
    drivers = sub.add_parser(
        "drivers",
        help="list drivers: package, features, capabilities, options",
        description="Lists every registered driver: its class, the plugin and the package "
        "(distribution and version) that registered it, its features, the optional "
        "capabilities it implements (checked on the class, without connecting) and its "
        "options.",
    )
    drivers.add_argument("--json", action="store_true", help="machine-readable output")
    drivers.set_defaults(func=cmd_drivers)
    conformance = sub.add_parser(
        "conformance",
        help="run the conformance suite against a driver",
        description=textwrap.dedent(
            """\
            Runs the conformance suite shipped in channels_lite.conformance against a registered
            driver. Options are passed to the driver; values are parsed as JSON when they can be
            (numbers, true/false), else kept as strings. In string values, {tmp_path} becomes
            the test's temporary directory and {unique} a token unique to the test. Each test
            gets empty storage: a fresh 'path' file, and a fresh 'prefix', 'key_prefix',
            'table_prefix' or 'store' when the driver has such an option and it is not given.
            Arguments after '--' go to pytest."""
        ),
    )
    conformance.add_argument("--driver", required=True, help="registered driver name")
    conformance.add_argument(
        "--option", action="append", type=_parse_option, metavar="KEY=VALUE", help="driver option"
    )
    conformance.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    conformance.set_defaults(func=cmd_conformance)
    stats = sub.add_parser(
        "stats",
        help="pending messages, groups, processes, storage size",
        description="Per channel layer: messages pending per channel (top N), groups and their "
        "member counts, live processes, expired rows awaiting purge, storage size. Needs the "
        "driver's optional SupportsStats capability (exit status 3 without it).",
    )
    add_layer_arguments(stats)
    add_stats_arguments(stats)
    stats.set_defaults(func=cmd_stats)
    purge = sub.add_parser(
        "purge",
        help="delete expired messages and memberships now",
        description="Deletes expired messages and group memberships (the layer also does this "
        "in the background every purge_interval seconds). With --vacuum, for SQLite, then "
        "checkpoints the WAL and VACUUMs the file, which locks the database while it runs.",
    )
    add_layer_arguments(purge)
    add_purge_arguments(purge)
    purge.set_defaults(func=cmd_purge)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
        # Inside the try: output still buffered fails here, not at interpreter exit.
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`channels-lite drivers | head -1`): stop quietly, as other
        # command-line tools do. Python's own last flush of stdout at exit would raise again,
        # so stdout goes to devnull (the recipe of the signal module's documentation).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 1
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
