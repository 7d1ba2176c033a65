"""Benchmark channels-lite against InMemory and channels_redis; writes a markdown table.

    uv run --with 'channels-redis>=4.2' python bench/run.py [--quick] [--repeat 3] \
        [--out bench/results.md]

See bench/README.md for what each scenario measures.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/run.py` puts bench/, not the repo, on sys.path
    sys.path.insert(0, str(ROOT))

from bench import legacy, xproc  # noqa: E402
from bench.catalog import SCENARIOS, RunContext, Scenario  # noqa: E402
from bench.layers import LAYERS, BenchEnv, LayerSpec, drop_storage, layer_config  # noqa: E402
from bench.postgres_server import (  # noqa: E402
    INSTALL_HINT as PG_INSTALL_HINT,
)
from bench.postgres_server import (  # noqa: E402
    PostgresServer,
    PostgresUnavailable,
    postgres_bin,
    postgres_version,
)
from bench.redis_server import (  # noqa: E402
    INSTALL_HINT,
    RedisServer,
    RedisUnavailable,
    redis_server_binary,
    redis_server_version,
)
from bench.report import Results, machine, render  # noqa: E402
from bench.sizes import FULL, QUICK, SMOKE, Sizes  # noqa: E402

logger = logging.getLogger("bench")

DEFAULT_LAYERS = ["inmemory", "redis-core", "redis-pubsub", "lite-sqlite", "lite-memory"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/run.py", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smaller N, ~1 s idle window")
    size.add_argument("--smoke", action="store_true", help="tiny N, for the test suite")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions (median), default 3")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results.md", help="markdown report path"
    )
    parser.add_argument(
        "--layers",
        default=",".join(DEFAULT_LAYERS),
        help=f"comma-separated, from: {', '.join(LAYERS)} "
        "(default: all but lite-0.4, lite-postgres, channels-postgres)",
    )
    parser.add_argument(
        "--scenarios",
        default=",".join(s.key for s in SCENARIOS if not s.optional),
        help=f"comma-separated, from: {', '.join(s.key for s in SCENARIOS)}",
    )
    parser.add_argument(
        "--soak",
        type=float,
        default=0,
        metavar="SECONDS",
        help="also run the memory soak for this long (the goal says 600) on --soak-layers",
    )
    parser.add_argument(
        "--soak-layers",
        default="lite-sqlite",
        help="layers that run the soak (default: %(default)s)",
    )
    parser.add_argument(
        "--growth-layers",
        default="lite-sqlite,redis-core,lite-memory",
        help="layers that run the growth curves (default: %(default)s)",
    )
    parser.add_argument(
        "--legacy",
        action="store_true",
        help="also run channels-lite 0.4 from PyPI, in its own venv (see --legacy-venv)",
    )
    parser.add_argument(
        "--legacy-venv",
        type=Path,
        default=Path(tempfile.gettempdir()) / "channels-lite-0.4-bench-venv",
        help="venv for channels-lite 0.4, created with uv if missing (default: %(default)s)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    for name, known in (("layers", LAYERS), ("growth_layers", LAYERS), ("soak_layers", LAYERS)):
        unknown = [k for k in getattr(args, name).split(",") if k and k not in known]
        if unknown:
            parser.error(f"unknown layer(s) {unknown}; choose from {', '.join(known)}")
    keys = {s.key for s in SCENARIOS}
    unknown = [k for k in args.scenarios.split(",") if k and k not in keys]
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; choose from {', '.join(sorted(keys))}")
    return args


def _summary(metrics: dict[str, Any]) -> str:
    if "error" in metrics:
        return "ERROR " + metrics["error"].strip().splitlines()[-1][:100]
    parts = []
    for key, value in metrics.items():
        if isinstance(value, float):
            parts.append(f"{key}={value:,.2f}" if abs(value) < 100 else f"{key}={value:,.0f}")
        elif isinstance(value, int):
            parts.append(f"{key}={value}")
    return " ".join(parts)


class Runner:
    def __init__(self, env: BenchEnv, server: RedisServer | None, sizes: Sizes, legacy_python):
        self.env = env
        self.server = server
        self.sizes = sizes
        self.legacy_python = legacy_python
        self.notes: list[str] = []

    def _remove(self, key: str, config: dict[str, Any]) -> None:
        drop_storage(key, config, self.env)
        path = config.get("path")
        if path:
            for suffix in ("", "-wal", "-shm", "-journal"):
                with contextlib.suppress(OSError):
                    os.remove(path + suffix)

    def run(self, scenario: Scenario, spec: LayerSpec, tag: str) -> dict[str, Any]:
        metrics = self._run(scenario, spec, tag)
        server = self.server
        # If redis-server died under this run, that was not the layer's fault: run it again.
        if "error" in metrics and spec.needs_redis and server is not None and not server.alive():
            logger.warning("retrying %s on %s after redis-server died", scenario.key, spec.label)
            metrics = self._run(scenario, spec, tag)
        return metrics

    def _run(self, scenario: Scenario, spec: LayerSpec, tag: str) -> dict[str, Any]:
        configs: list[dict[str, Any]] = []

        def fresh() -> dict[str, Any]:
            if spec.needs_redis and self.server is not None:
                self.server.flushall()
            config = layer_config(spec.key, self.env, tag)
            configs.append(config)
            return config

        server = self.server if spec.needs_redis else None
        ctx = RunContext(
            self.sizes, server.cpu_seconds if server is not None else (lambda: None), fresh
        )
        try:
            if server is not None and not server.alive():
                # Something outside the harness stopped it (seen: a broad `pkill redis-server`).
                why = server.death()
                logger.warning("redis-server died (%s); restarting it", why)
                self.notes.append(f"redis-server died during the run ({why}) and was restarted.")
                server.restart()
                self.env.redis_url = server.url
            config = fresh()
            if spec.external:
                return legacy.run_scenario(self.legacy_python, scenario.key, config, self.sizes)
            return scenario.run(spec, config, ctx)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:
            logger.debug(
                "%s on %s failed (details with -v)", scenario.key, spec.label, exc_info=True
            )
            text = f"{type(exc).__name__}: {exc}".strip()
            if isinstance(exc, TimeoutError) and not str(exc):
                text = f"timeout after {self.sizes.timeout:g} s"
            return {"error": text}
        finally:
            xproc.terminate_all()
            for config in configs:
                self._remove(spec.key, config)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("channels_lite", "channels_redis", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)

    sizes = SMOKE if args.smoke else QUICK if args.quick else FULL
    wanted = [k for k in args.layers.split(",") if k]
    if args.legacy and "lite-0.4" not in wanted:
        wanted.append("lite-0.4")
    if args.soak > 0:
        sizes = dataclasses.replace(sizes, soak_seconds=args.soak)
        if "soak" not in args.scenarios.split(","):
            args.scenarios += ",soak"
    scenarios = [s for s in SCENARIOS if s.key in args.scenarios.split(",")]
    growth_layers = set(args.growth_layers.split(","))
    soak_layers = set(args.soak_layers.split(","))
    notes: list[str] = []

    if any(LAYERS[k].needs_redis for k in wanted):
        reason = None
        try:
            import channels_redis  # noqa: F401
        except ImportError:
            reason = (
                "channels_redis is not installed; run with "
                "`uv run --with 'channels-redis>=4.2' python bench/run.py`"
            )
        if reason is None and redis_server_binary() is None:
            reason = f"redis-server is not on PATH; {INSTALL_HINT}"
        if reason:
            logger.warning("skipping the channels_redis layers: %s", reason)
            notes.append(f"channels_redis layers skipped: {reason}.")
            wanted = [k for k in wanted if not LAYERS[k].needs_redis]
    if any(LAYERS[k].needs_postgres for k in wanted):
        missing: dict[str, str] = {}
        if postgres_bin() is None:
            for k in wanted:
                if LAYERS[k].needs_postgres:
                    missing[k] = f"PostgreSQL is not installed; {PG_INSTALL_HINT}"
        try:
            import psycopg  # noqa: F401
        except ImportError:
            missing.setdefault(
                "lite-postgres", "psycopg is not installed; run `uv sync --extra postgres`"
            )
        if "channels-postgres" in wanted:
            try:
                import channels_postgres  # noqa: F401
            except ImportError:
                missing.setdefault(
                    "channels-postgres",
                    "channels_postgres is not installed; run with "
                    "`uv run --with 'channels-postgres==1.1.4' python bench/run.py`",
                )
        for k, reason in missing.items():
            if k in wanted:
                logger.warning("skipping %s: %s", LAYERS[k].label, reason)
                notes.append(f"{LAYERS[k].label} skipped: {reason}.")
                wanted.remove(k)
    legacy_python = None
    if "lite-0.4" in wanted:
        try:
            legacy_python = legacy.ensure_venv(args.legacy_venv)
        except legacy.LegacyUnavailable as exc:
            logger.warning("skipping channels-lite 0.4: %s", exc)
            notes.append(f"channels-lite 0.4 skipped: {exc}")
            wanted.remove("lite-0.4")
        else:
            notes.append(legacy.NOTE)
    layers = [LAYERS[k] for k in LAYERS if k in wanted]
    if not layers:
        logger.error("no layer left to run")
        return 2

    started = time.monotonic()
    results = Results()
    server: RedisServer | None = None
    pg: PostgresServer | None = None
    info: dict[str, str] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
            if any(spec.needs_redis for spec in layers):
                try:
                    server = RedisServer().start()
                except RedisUnavailable as exc:
                    logger.warning("skipping the channels_redis layers: %s", exc)
                    notes.append(f"channels_redis layers skipped: {exc}")
                    layers = [spec for spec in layers if not spec.needs_redis]
            if any(spec.needs_postgres for spec in layers):
                try:
                    pg = PostgresServer()
                    pg.start()
                except PostgresUnavailable as exc:
                    pg = None
                    logger.warning("skipping the PostgreSQL layers: %s", exc)
                    notes.append(f"PostgreSQL layers skipped: {exc}")
                    layers = [spec for spec in layers if not spec.needs_postgres]
                else:
                    notes.append(
                        f"PostgreSQL {postgres_version()} started by the harness on 127.0.0.1 "
                        "(fsync, full_page_writes and synchronous_commit off; a fresh schema "
                        "per channels-lite postgres instance, a fresh database per "
                        "channels_postgres instance)."
                    )
            info = machine(redis_server_version() if server else None)
            if pg is not None:
                info["postgresql"] = postgres_version() or "?"
                if any(spec.key == "channels-postgres" for spec in layers):
                    from importlib.metadata import version

                    info["channels-postgres"] = version("channels-postgres")
            logger.info(
                "%s run, %d repetition(s), layers: %s",
                sizes.name,
                args.repeat,
                ", ".join(spec.label for spec in layers),
            )
            env = BenchEnv(Path(tmp), server.url if server else None, pg)
            runner = Runner(env, server, sizes, legacy_python)
            plan = [
                (scenario, spec)
                for scenario in scenarios
                for spec in layers
                if scenario.applies(spec)
                and (not scenario.growth or spec.key in growth_layers)
                and (scenario.key != "soak" or spec.key in soak_layers)
            ]
            total, done = len(plan) * args.repeat, 0
            for rep in range(args.repeat):
                for scenario in scenarios:
                    # Rotate the order each repetition so no layer always runs first or last.
                    specs = [spec for s, spec in plan if s is scenario]
                    shift = rep % len(specs) if specs else 0
                    for spec in specs[shift:] + specs[:shift]:
                        t0 = time.monotonic()
                        metrics = runner.run(scenario, spec, f"{scenario.key}-{rep}")
                        results.add(scenario.key, spec.key, metrics)
                        done += 1
                        logger.info(
                            "[%d/%d rep %d] %-15s %-24s %s (%.1f s)",
                            done,
                            total,
                            rep + 1,
                            scenario.key,
                            spec.label,
                            _summary(metrics),
                            time.monotonic() - t0,
                        )
            notes += runner.notes
    except KeyboardInterrupt:
        logger.warning("interrupted; nothing written")
        return 130
    finally:
        xproc.terminate_all()
        if server is not None:
            server.stop()
        if pg is not None:
            pg.stop()

    withs = "--with 'channels-redis>=4.2' "
    if any(spec.key == "channels-postgres" for spec in layers):
        withs += "--with 'channels-postgres==1.1.4' "
    command = f"uv run {withs}python bench/run.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    report = render(
        results,
        layers,
        sizes,
        args.repeat,
        info,
        notes,
        command.strip(),
        time.monotonic() - started,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    logger.info("wrote %s", args.out)
    sys.stdout.write(report)
    return 0


def _exit(code: int) -> None:
    """Exit, even if a layer left a non-daemon thread behind (it would block the exit)."""
    stuck = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    for thread in stuck:
        thread.join(2)
    stuck = [t for t in stuck if t.is_alive()]
    if stuck:
        logger.warning(
            "threads left running (%s); exiting anyway", ", ".join(t.name for t in stuck)
        )
        logging.shutdown()
        sys.stdout.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    _exit(main())
