"""channels-lite 0.4 from PyPI, run in its own virtualenv (it shares our import name).

The harness creates the venv with ``uv`` on first use, then runs each scenario in a child
``python -m bench.worker`` there (with the repository root on ``PYTHONPATH`` for ``bench``,
but not ``src/``, so ``channels_lite`` is 0.4). 0.4 is ``AIOSQLiteChannelLayer`` over a Django
database alias, so the child configures a minimal Django project and migrates the file first.
0.4 polls every 100 ms, so it runs with smaller N (:func:`legacy_sizes`): its rates are still
comparable, only less precise.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.sizes import Sizes

logger = logging.getLogger("bench.legacy")

CLOSE_TIMEOUT = 5.0
REQUIREMENT = "channels-lite[aio]==0.4.*"
ROOT = Path(__file__).resolve().parent.parent
NOTE = (
    "channels-lite 0.4 (PyPI, AIOSQLiteChannelLayer) runs in its own virtualenv, one child "
    "process per scenario, with smaller N (it polls every 100 ms)."
)
_CHECK = (
    "import channels_lite.layers.aio, importlib.metadata as m; print(m.version('channels-lite'))"
)


class LegacyUnavailable(RuntimeError):
    pass


def ensure_venv(path: Path) -> str:
    """The python of a venv with channels-lite 0.4, creating it with uv if needed."""
    python = path / "bin" / "python"
    if python.exists():
        check = subprocess.run([python, "-c", _CHECK], capture_output=True, text=True, check=False)
        if check.returncode == 0 and check.stdout.startswith("0.4"):
            return str(python)
    uv = shutil.which("uv")
    if uv is None:
        raise LegacyUnavailable("uv is not on PATH to create its virtualenv")
    logger.info("creating %s with %s (one-time)", path, REQUIREMENT)
    major, minor = sys.version_info[:2]
    steps = [
        [uv, "venv", "--quiet", "--clear", "--python", f"{major}.{minor}", str(path)],
        [uv, "pip", "install", "--quiet", "--python", str(python), REQUIREMENT],
    ]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise LegacyUnavailable(f"`{' '.join(step[:3])} ...` failed: {' '.join(tail)}")
    check = subprocess.run([python, "-c", _CHECK], capture_output=True, text=True, check=False)
    if check.returncode != 0:
        raise LegacyUnavailable(f"installed, but it does not import: {check.stderr.strip()[-300:]}")
    return str(python)


def legacy_sizes(sizes: Sizes) -> Sizes:
    """Smaller N for 0.4, so that one run stays within minutes."""
    return dataclasses.replace(
        sizes,
        pingpong=min(sizes.pingpong, 30),
        ps_messages=min(sizes.ps_messages, 500),
        normal_messages=min(sizes.normal_messages, 300),
        group_sends=min(sizes.group_sends, 10),
        latency_messages=min(sizes.latency_messages, 200),
        xput_messages=min(sizes.xput_messages, 1_000),
        drain_messages=min(sizes.drain_messages, 1_000),
        growth_channels=tuple(c for c in sizes.growth_channels if c <= 1_000),
        growth_messages=min(sizes.growth_messages, 300),
        growth_members=tuple(c for c in sizes.growth_members if c <= 100),
        growth_deliveries=min(sizes.growth_deliveries, 300),
    )


def run_scenario(python: str | None, scenario: str, config: dict[str, Any], sizes: Sizes) -> Any:
    """Run one scenario in the 0.4 venv; returns its metrics."""
    if python is None:
        raise LegacyUnavailable("no virtualenv")
    small = legacy_sizes(sizes)
    request = {"scenario": scenario, "config": config, "sizes": dataclasses.asdict(small)}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("VIRTUAL_ENV", None)
    points = max(len(small.growth_channels), len(small.growth_members), 1)
    done = subprocess.run(
        [python, "-m", "bench.worker", json.dumps(request)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=small.timeout * points + small.idle_seconds + 60,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip()[-2000:] or f"worker exited {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def migrate(config: dict[str, Any]) -> None:
    """Configure Django for 0.4 and create its tables in ``config['path']``."""
    _configure(config["path"])
    from django.core.management import call_command

    call_command("migrate", "channels_lite", database="channels", verbosity=0)


def _configure(path: str) -> None:
    import django
    from django.conf import settings

    if not settings.configured:
        settings.configure(
            DATABASES={
                "default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"},
                "channels": {"ENGINE": "django.db.backends.sqlite3", "NAME": path},
            },
            INSTALLED_APPS=["channels_lite"],
            USE_TZ=True,
        )
        django.setup()


def build(config: dict[str, Any]) -> Any:
    _configure(config["path"])
    from channels_lite.layers.aio import AIOSQLiteChannelLayer

    options = {k: v for k, v in config.items() if k != "path"}
    return AIOSQLiteChannelLayer(database="channels", **options)


async def close(layer: Any) -> None:
    # 0.4's close() can wait forever on a polling task that swallowed its cancellation.
    try:
        await asyncio.wait_for(layer.close(), CLOSE_TIMEOUT)
    except TimeoutError:
        logger.warning("channels-lite 0.4: close() did not finish in %g s", CLOSE_TIMEOUT)
