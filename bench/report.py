"""Medians, ratios, the goals of issue 3, and the markdown report."""

from __future__ import annotations

import math
import os
import platform
import sqlite3
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from bench.catalog import SCENARIOS, Scenario
from bench.layers import BASELINE, CEILING, LAYERS, SUBJECT, LayerSpec
from bench.sizes import Sizes
from bench.stats import median, percentile

Metrics = dict[str, Any]


@dataclass
class Results:
    """scenario key -> layer key -> one Metrics per repetition (``{"error": ...}`` on failure)."""

    runs: dict[str, dict[str, list[Metrics]]] = field(default_factory=dict)

    def add(self, scenario: str, layer: str, metrics: Metrics) -> None:
        self.runs.setdefault(scenario, {}).setdefault(layer, []).append(metrics)

    def ok(self, scenario: str, layer: str) -> list[Metrics]:
        return [m for m in self.runs.get(scenario, {}).get(layer, []) if "error" not in m]

    def errors(self, scenario: str, layer: str) -> list[str]:
        return [m["error"] for m in self.runs.get(scenario, {}).get(layer, []) if "error" in m]

    def median(self, scenario: str, layer: str, metric: str) -> float | None:
        values = [m[metric] for m in self.ok(scenario, layer) if metric in m]
        value = median(values) if values else math.nan
        return None if math.isnan(value) else value

    def worst(self, scenario: str, layer: str, metric: str) -> float | None:
        values = [m[metric] for m in self.ok(scenario, layer) if metric in m]
        return max(values) if values else None


# -- formatting ---------------------------------------------------------------------------


def _num(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "—"
    if digits == 0:
        return f"{value:,.0f}"
    return f"{value:,.{digits}f}"


def _ms(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.2f}" if value < 10 else f"{value:,.0f}"


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "—"
    r = a / b
    return f"{r:.2f}x" if r < 10 else f"{r:,.0f}x"


def _flags(res: Results, s: str, layer: str, always_dup: bool = False) -> str:
    parts = []
    dup = res.worst(s, layer, "duplicates")
    lost = res.worst(s, layer, "lost")
    if dup is not None and (dup or always_dup):
        parts.append(f"{dup:,.0f} dup")
    if lost:
        parts.append(f"{lost:,.0f} lost")
    return f" ({', '.join(parts)})" if parts else ""


def cell(res: Results, scenario: Scenario, spec: LayerSpec) -> str:
    s, k = scenario.key, spec.key
    if not scenario.applies(spec):
        return "n/a"
    if s == "group-p99":
        return _ms(res.median("group", k, "p99_ms")) if res.ok("group", k) else "—"
    if not res.runs.get(s, {}).get(k):
        return "not run"
    if not res.ok(s, k):
        err = res.errors(s, k)[0].splitlines()[0]
        return f"error: {err[:60]}"
    if s in ("latency", "sporadic"):
        return f"{_ms(res.median(s, k, 'p50_ms'))} / {_ms(res.median(s, k, 'p99_ms'))}" + _flags(
            res, s, k
        )
    if s == "idle":
        text = _num(res.median(s, k, "cpu_pct"), 2)
        server = res.median(s, k, "server_cpu_pct")
        if server is not None:
            text += f" (+{server:.2f} redis-server)"
        growth = res.worst(s, k, "growth_bytes")
        if growth is not None:
            text += f" (file +{growth:,.0f} B)"
        return text
    if s == "soak":
        a, b = res.median(s, k, "rss_start_mb"), res.median(s, k, "rss_end_mb")
        objects = res.worst(s, k, "objects_growth")
        return f"{_num(a, 1)} → {_num(b, 1)} (objects {objects:+,.0f})"
    always_dup = s in ("normal", "drain")
    return _num(res.median(s, k, "rate")) + _flags(res, s, k, always_dup)


def ratio_cell(res: Results, scenario: Scenario, other: str, subject: str = SUBJECT) -> str:
    s = scenario.key
    if s in ("latency", "sporadic"):
        return " / ".join(
            _ratio(res.median(s, subject, m), res.median(s, other, m)) for m in ("p50_ms", "p99_ms")
        )
    if s == "group-p99":
        return _ratio(res.median("group", subject, "p99_ms"), res.median("group", other, "p99_ms"))
    if s == "soak":
        return "—"
    metric = "cpu_pct" if s == "idle" else "rate"
    return _ratio(res.median(s, subject, metric), res.median(s, other, metric))


_GROUP_P99 = Scenario("group-p99", "", "", lambda *a: {})


def main_table(res: Results, layers: list[LayerSpec], sizes: Sizes) -> list[str]:
    subject = LAYERS[SUBJECT].label
    head = ["scenario", "unit", *(spec.label for spec in layers)]
    head += [f"{subject} ÷ {LAYERS[BASELINE].label}", f"{subject} ÷ {LAYERS[CEILING].label}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows: list[tuple[Scenario, str, str]] = []
    for scenario in SCENARIOS:
        if scenario.growth or scenario.key not in res.runs:
            continue
        rows.append((scenario, scenario.describe(sizes), scenario.unit))
        if scenario.key == "group":
            rows.append((_GROUP_P99, "… delay group_send → receipt, p99", "ms"))
    for scenario, title, unit in rows:
        cells = [title, unit]
        for spec in layers:
            cells.append(cell(res, scenario, spec))
        cells += [ratio_cell(res, scenario, BASELINE), ratio_cell(res, scenario, CEILING)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


#: The PostgreSQL comparison of issue 6: channels-lite postgres against these layers.
PG_SUBJECT = "lite-postgres"
PG_OTHERS = ("redis-core", "channels-postgres")


def postgres_table(res: Results, layers: list[LayerSpec]) -> list[str]:
    """Ratios of channels-lite postgres to channels_redis core and channels_postgres."""
    keys = {spec.key for spec in layers}
    others = [k for k in PG_OTHERS if k in keys]
    if PG_SUBJECT not in keys or not others:
        return []
    subject = LAYERS[PG_SUBJECT].label
    head = ["scenario", *(f"{subject} ÷ {LAYERS[k].label}" for k in others)]
    lines = [
        f"## {subject} compared (issue 6)",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for scenario in SCENARIOS:
        if scenario.growth or scenario.key not in res.runs or scenario.key == "soak":
            continue
        rows = [(scenario, scenario.key)]
        if scenario.key == "group":
            rows.append((_GROUP_P99, "group p99 delay"))
        for row, title in rows:
            cells = [title]
            for k in others:
                ok = res.ok(row.key if row is not _GROUP_P99 else "group", k)
                cells.append(ratio_cell(res, row, k, PG_SUBJECT) if ok else "— (error)")
            lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Rates: above 1x means channels-lite postgres is faster; latency and delay: below 1x "
        "means it is better.",
        "",
    ]
    return lines


#: Latency scenarios whose every delay is kept (``delays_ms``), and the percentiles shown of
#: them pooled over all repetitions.
_POOLED = ("latency", "sporadic")
_POOLED_PCTS = (50.0, 90.0, 99.0, 99.9)


def _pairs(res: Results, s: str, a: str, b: str, metric: str) -> tuple[int, int]:
    """(repetitions where ``a``'s metric was lower than ``b``'s, repetitions with both)."""
    runs_a = res.runs.get(s, {}).get(a, [])
    runs_b = res.runs.get(s, {}).get(b, [])
    lower = both = 0
    for ma, mb in zip(runs_a, runs_b, strict=False):
        if metric in ma and metric in mb:
            both += 1
            lower += ma[metric] < mb[metric]
    return lower, both


def pooled_tables(res: Results, layers: list[LayerSpec]) -> list[str]:
    """Latency percentiles over every message of every repetition, and paired counts.

    A repetition's p99 is decided by its handful of slowest messages, often one scheduling
    hiccup of this machine; pooled, the p99 rests on a hundred of them.
    """
    lines: list[str] = []
    keys = [spec.key for spec in layers]
    for s in _POOLED:
        rows = []
        for spec in layers:
            delays = [d for m in res.ok(s, spec.key) for d in m.get("delays_ms", ())]
            if delays:
                cells = [_ms(percentile(delays, pct)) for pct in _POOLED_PCTS]
                rows.append(f"| {spec.label} | {len(delays):,} | " + " | ".join(cells) + " |")
        if not rows:
            continue
        head = " | ".join(f"p{pct:g}" for pct in _POOLED_PCTS)
        lines += [
            f"## {s}: every repetition pooled (ms)",
            "",
            f"| layer | messages | {head} |",
            "|" + "---|" * (2 + len(_POOLED_PCTS)),
            *rows,
            "",
        ]
        for subject in (PG_SUBJECT, SUBJECT):
            if subject not in keys:
                continue
            for other in keys:
                if other == subject or not res.ok(s, other):
                    continue
                p50, n = _pairs(res, s, subject, other, "p50_ms")
                p99, _ = _pairs(res, s, subject, other, "p99_ms")
                if n:
                    lines.append(
                        f"- {LAYERS[subject].label} against {LAYERS[other].label}, same "
                        f"repetition: lower p50 in {p50} of {n}, lower p99 in {p99} of {n}."
                    )
        lines.append("")
    return lines


def growth_tables(res: Results, layers: list[LayerSpec]) -> list[str]:
    lines: list[str] = []
    for scenario in SCENARIOS:
        if not scenario.growth or scenario.key not in res.runs:
            continue
        points: list[str] = []
        for spec in layers:
            for m in res.ok(scenario.key, spec.key):
                points += [p for p in m if p not in points]
        points.sort(key=int)
        what = "channels" if scenario.key == "growth-channels" else "members"
        head = ["layer", *(f"{int(p):,} {what}" for p in points), "worst ÷ first"]
        lines += [f"**{scenario.title}** (µs per message, lower is better)", ""]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for spec in layers:
            if spec.key not in res.runs[scenario.key]:
                continue
            values = [res.median(scenario.key, spec.key, p) for p in points]
            row = [spec.label, *(_num(v, 1) for v in values)]
            known = [v for v in values if v is not None]
            row.append(_ratio(max(known), values[0]) if known else "—")
            if not res.ok(scenario.key, spec.key):
                row = [spec.label] + ["error"] * (len(head) - 1)
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return lines


# -- goals --------------------------------------------------------------------------------


def goals(res: Results) -> list[str]:
    """Each goal of issue 3 as met / not met / not measured, with the numbers."""
    out: list[str] = []
    m = res.median

    def check(text: str, ok: bool | None, detail: str) -> None:
        mark = {True: "met", False: "NOT met", None: "not measured"}[ok]
        out.append(f"- **{mark}**: {text} — {detail}")

    def ge(a: float | None, b: float | None, factor: float) -> bool | None:
        return None if a is None or b is None else a >= factor * b

    def both(*flags: bool | None) -> bool | None:
        return None if any(f is None for f in flags) else all(flags)

    def once(s: str) -> bool | None:
        if not res.ok(s, SUBJECT):
            return None
        return not res.worst(s, SUBJECT, "duplicates") and not res.worst(s, SUBJECT, "lost")

    def f(v: float | None, digits: int = 0) -> str:
        return _num(v, digits)

    pp, ppr, ppm = (
        m("pingpong", SUBJECT, "rate"),
        m("pingpong", BASELINE, "rate"),
        m("pingpong", CEILING, "rate"),
    )
    check(
        "ping-pong ≥ 10x channels_redis core and ≥ 30% of InMemory",
        both(ge(pp, ppr, 10), ge(pp, ppm, 0.3)),
        f"{f(pp)} vs {f(ppr)} ({_ratio(pp, ppr)}) and {f(ppm)} ({_ratio(pp, ppm)})",
    )
    for key, text in (
        ("specific", "process-specific throughput, one process ≥ 10x channels_redis core"),
        ("normal", "normal channel, 4 receivers ≥ 10x channels_redis core, exactly once"),
    ):
        a, b = m(key, SUBJECT, "rate"), m(key, BASELINE, "rate")
        ok = ge(a, b, 10) if key == "specific" else both(ge(a, b, 10), once(key))
        extra = ""
        if key == "normal":
            extra = (
                f", worst duplicates {f(res.worst(key, SUBJECT, 'duplicates'))}"
                f", lost {f(res.worst(key, SUBJECT, 'lost'))}"
            )
        check(text, ok, f"{f(a)} vs {f(b)} msgs/s ({_ratio(a, b)}){extra}")
    g, gr = m("group", SUBJECT, "rate"), m("group", BASELINE, "rate")
    p, pr = m("group", SUBJECT, "p99_ms"), m("group", BASELINE, "p99_ms")
    check(
        "group fan-out to 100 ≥ 2x channels_redis core; p99 delay ≤ channels_redis core's",
        both(ge(g, gr, 2), None if p is None or pr is None else p <= pr),
        f"{f(g)} vs {f(gr)} msgs/s ({_ratio(g, gr)}); p99 {_ms(p)} vs {_ms(pr)} ms",
    )
    p50, p99 = m("latency", SUBJECT, "p50_ms"), m("latency", SUBJECT, "p99_ms")
    check(
        "cross-process latency p50 ≤ 1 ms and p99 ≤ 3 ms at 200 msg/s",
        None if p50 is None or p99 is None else p50 <= 1 and p99 <= 3,
        f"p50 {_ms(p50)} ms, p99 {_ms(p99)} ms",
    )
    x = m("xput", SUBJECT, "rate")
    check(
        "cross-process throughput, one sender process → one receiver ≥ 10,000 msgs/s",
        None if x is None else x >= 10_000,
        f"{f(x)} msgs/s (sender side {f(m('xput', SUBJECT, 'send_rate'))} msgs/s)",
    )
    d = m("drain", SUBJECT, "rate")
    check(
        "normal channel drained by 3 receiver processes ≥ 5,000 msgs/s, exactly once",
        both(None if d is None else d >= 5_000, once("drain")),
        f"{f(d)} msgs/s, worst duplicates {f(res.worst('drain', SUBJECT, 'duplicates'))}, "
        f"lost {f(res.worst('drain', SUBJECT, 'lost'))}",
    )
    cpu, grow = m("idle", SUBJECT, "cpu_pct"), res.worst("idle", SUBJECT, "growth_bytes")
    check(
        "idle: a process with waiting receivers uses < 0.5% of one core",
        None if cpu is None else cpu < 0.5,
        f"{f(cpu, 2)}% of one core",
    )
    check(
        "idle: the database file does not grow while idle",
        None if grow is None else grow <= 0,
        f"largest growth over the idle window {f(grow)} bytes (database + WAL)",
    )
    text = "memory flat over a 10-minute soak with consumers connecting and disconnecting"
    if res.ok("soak", SUBJECT):
        runs = res.ok("soak", SUBJECT)
        growth = max(r["rss_growth_pct"] for r in runs)
        objects = max(r["objects_growth"] for r in runs)
        leftovers = max(
            max(r["tasks_growth"], r.get("left_buffers", 0) + r.get("left_open", 0)) for r in runs
        )
        settled = max(r.get("settled_s", 0) for r in runs)
        consumers = min(r["consumers"] for r in runs)
        seconds = max(r.get("seconds", 0) for r in runs)
        check(
            text + " (read as: RSS +5% at most; once the last consumer left, no task, buffer "
            "or open channel left; fewer than 1 Python object left per 100 consumers)",
            growth <= 5 and leftovers <= 0 and objects < consumers / 100,
            f"{seconds:g} s, {consumers:,} consumers in the measured 2/3: RSS {growth:+.1f}%, "
            f"Python objects {objects:+,}, tasks and channels left {leftovers} "
            f"({settled:g} s after the last consumer left); RSS MB over time "
            + ", ".join(f"{t:.0f} s: {mb:.0f}" for t, mb in runs[0].get("rss_curve", []))
            + (
                f"; database file {runs[0]['db_mb']:.1f} MB at the end"
                if "db_mb" in runs[0]
                else ""
            )
            + (
                " (too short to judge: the first sample must come after expiry, 60 s, and a "
                "purge, 30 s; use --soak 300 or more)"
                if seconds < 300
                else ""
            ),
        )
    else:
        check(text, None, "not run (opt in with --soak 600)")
    for key, what in (("growth-channels", "channels"), ("growth-members", "group members")):
        runs = res.ok(key, SUBJECT)
        if not runs:
            check(f"cost per message flat over {what}", None, "not run")
            continue
        points = sorted({p for r in runs for p in r}, key=int)
        values = [m(key, SUBJECT, p) for p in points]
        curve = ", ".join(
            f"{int(p):,}: {_num(v, 1)} µs" for p, v in zip(points, values, strict=True)
        )
        known = [v for v in values if v is not None]
        worst = max(known) / values[0] if known and values[0] else None
        check(
            f"cost per message flat from {int(points[0]):,} to {int(points[-1]):,} {what} "
            f"(read as: no point costs more than 2x the first, {int(points[0]):,})",
            None if worst is None or len(known) < len(values) else worst <= 2,
            f"{curve}; worst ÷ first {_ratio(worst, 1.0)}",
        )
    return out


# -- machine ------------------------------------------------------------------------------


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine(redis_version: str | None) -> dict[str, str]:
    return {
        "cpu": f"{os.cpu_count()} x {_cpu_model()}",
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "sqlite": sqlite3.sqlite_version,
        "redis-server": redis_version or "not available",
        "channels": _version("channels"),
        "channels-redis": _version("channels-redis"),
        "redis-py": _version("redis"),
        "channels-lite": _version("channels-lite"),
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def render(
    res: Results,
    layers: list[LayerSpec],
    sizes: Sizes,
    repeat: int,
    info: dict[str, str],
    notes: list[str],
    command: str,
    elapsed: float,
) -> str:
    info = {**info, "load average at end": " ".join(f"{x:.2f}" for x in os.getloadavg())}
    lines = [
        "# channels-lite benchmark",
        "",
        f"`{command}` — {sizes.name} sizes, medians of {repeat} repetition(s), "
        f"layers interleaved within each repetition; {elapsed / 60:.1f} min.",
        "",
        *main_table(res, layers, sizes),
        "",
        "Rates are medians (higher is better); latency, delay and CPU are medians (lower is "
        "better), so a ratio below 1x there means channels-lite sqlite is better. Duplicates "
        "and lost messages are the worst repetition. Cross-process rows are n/a for "
        "in-process layers.",
        "",
        *postgres_table(res, layers),
        *pooled_tables(res, layers),
        *growth_tables(res, layers),
        "## Goals of issue 3 (channels-lite sqlite)",
        "",
        *goals(res),
        "",
    ]
    if notes:
        lines += ["## Notes", "", *(f"- {n}" for n in notes), ""]
    lines += ["## Machine", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in info.items()]
    lines += ["", "<details><summary>Every repetition</summary>", ""]
    for scenario in SCENARIOS:
        for spec in layers:
            runs = res.runs.get(scenario.key, {}).get(spec.key)
            if not runs:
                continue
            shown = [_compact(r) for r in runs]
            lines.append(f"- {scenario.key} · {spec.label}: " + "; ".join(shown))
    lines += ["", "</details>", ""]
    return "\n".join(lines)


def _compact(metrics: Metrics) -> str:
    if "error" in metrics:
        return "error: " + metrics["error"].strip().splitlines()[-1][:120]
    parts = []
    for k, v in metrics.items():
        if isinstance(v, list):
            continue  # raw samples (see pooled_tables)
        if isinstance(v, float):
            parts.append(f"{k}={v:,.2f}" if abs(v) < 100 else f"{k}={v:,.0f}")
        else:
            parts.append(f"{k}={v}")
    return " ".join(parts)
