"""The ``channels-lite`` command: list drivers, run the conformance suite against one."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .drivers.registry import DriverLookupError, available_drivers, driver_origin, get_driver_class

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
        features = cls.features
        rows.append(
            {
                "name": name,
                "class": f"{cls.__module__}.{cls.__qualname__}",
                "plugin": plugin,
                "version": version,
                "cross_process": features.cross_process,
                "persistent": features.persistent,
                "options": dict(cls.option_docs),
            }
        )
    if args.json:
        _out(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        _out(f"{row['name']}  ({row['class']}, plugin {row['plugin']}, version {row['version']})")
        _out(f"    cross_process={row['cross_process']} persistent={row['persistent']}")
        for key, doc in row["options"].items():
            _out(f"    option {key}: {doc}")
    return 0


_TEST_TEMPLATE = """\
import json
import pytest
from channels_lite.conformance import ConformanceTests

OPTIONS = json.loads({options!r})
NEEDS_PATH = {needs_path!r}


class TestConformance(ConformanceTests):
    @pytest.fixture
    def driver_options(self, tmp_path):
        options = dict(OPTIONS)
        if NEEDS_PATH and "path" not in options:
            options["path"] = str(tmp_path / "conformance.db")
        return options
"""


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
            _TEST_TEMPLATE.format(options=json.dumps(options), needs_path="path" in cls.option_docs)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="channels-lite",
        description="channels-lite: list storage drivers and check them against the contract.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    drivers = sub.add_parser("drivers", help="list registered drivers and their features")
    drivers.add_argument("--json", action="store_true", help="machine-readable output")
    drivers.set_defaults(func=cmd_drivers)
    conformance = sub.add_parser(
        "conformance",
        help="run the conformance suite against a driver",
        description=textwrap.dedent(
            """\
            Runs the conformance suite shipped in channels_lite.conformance against a registered
            driver. Options are passed to the driver; values are parsed as JSON when they can be
            (numbers, true/false), else kept as strings. Arguments after '--' go to pytest."""
        ),
    )
    conformance.add_argument("--driver", required=True, help="registered driver name")
    conformance.add_argument(
        "--option", action="append", type=_parse_option, metavar="KEY=VALUE", help="driver option"
    )
    conformance.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    conformance.set_defaults(func=cmd_conformance)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
