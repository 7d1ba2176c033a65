"""Where cross-process latency goes on the SQLite driver, stage by stage.

    uv run python bench/probe_latency.py [--messages 1000] [--rate 200] [--datagram]

One sender process sends to a process-specific channel of a receiver process at ``--rate``
messages a second (as the bench's latency scenario does). Both processes time the driver's
push and claim transactions and the receiver's inotify reader by wrapping them (a probe, not a
benchmark: the wrappers add a few microseconds). Prints the median of each stage over all
messages; stages are matched to messages by time, so read them as medians, not as a sum.

``--datagram`` also sends each message in a unix datagram straight after ``send()`` returned,
and reports when the receiver's reader got it: the bound a hand-off that carries the message
to the receiving process (instead of its claim transaction) could approach.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import multiprocessing as mp
import os
import socket
import statistics
import struct
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from channels_lite import ChannelLayer
from channels_lite.drivers.sqlite import notify, ops

Spans = dict[str, list[tuple[float, float]]]
_STAMP = struct.Struct("qd")  # message index, send time (time.monotonic, system-wide)


def _time_calls(owner: Any, name: str, tag: str, spans: Spans) -> None:
    original: Callable[..., Any] = getattr(owner, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.monotonic()
        try:
            return original(*args, **kwargs)
        finally:
            spans.setdefault(tag, []).append((start, time.monotonic()))

    setattr(owner, name, timed)


def _receiver(out: Any, path: str, address: bytes | None, warmup: int) -> None:
    spans: Spans = {}
    # Rounds that hand one message to a waiting receiver peek instead of claiming (once the
    # first ones have shown that messages come one at a time): both count as "the claim".
    _time_calls(ops, "claim", "claim", spans)
    _time_calls(ops, "peek", "claim", spans)
    _time_calls(notify.InotifyWatcher, "_readable", "inotify", spans)

    async def main() -> None:
        layer = ChannelLayer(driver="sqlite", path=path)
        channel = await layer.new_channel()
        loop = asyncio.get_running_loop()
        datagrams: dict[int, float] = {}
        sock = None
        if address is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.bind(address)
            sock.setblocking(False)

            def readable() -> None:
                while True:
                    try:
                        data = sock.recv(65536)
                    except BlockingIOError:
                        return
                    index, sent = _STAMP.unpack_from(data)
                    datagrams[index] = time.monotonic() - sent

            loop.add_reader(sock.fileno(), readable)
        out.put(channel)
        received: list[tuple[int, float, float]] = []
        while True:
            message = await asyncio.wait_for(layer.receive(channel), 10)
            now = time.monotonic()
            if message["type"] == "probe.stop":
                break
            if message["i"] >= 0:
                received.append((message["i"], message["t"], now))
        if sock is not None:
            loop.remove_reader(sock.fileno())
            sock.close()
        await layer.close()
        out.put((received, spans, {i: d for i, d in datagrams.items() if i >= 0}))

    asyncio.run(main())


def _median_us(values: list[float]) -> str:
    return f"{statistics.median(values) * 1e6:,.0f} µs" if values else "-"


def probe(messages: int, rate: float, datagram: bool) -> None:
    warmup = 20
    with tempfile.TemporaryDirectory(prefix="channels-lite-probe-") as directory:
        path = str(Path(directory) / "probe.sqlite3")
        address = f"\0channels-lite-probe-{os.getpid()}".encode() if datagram else None
        context = mp.get_context("spawn")
        out = context.Queue()
        child = context.Process(target=_receiver, args=(out, path, address, warmup))
        child.start()
        channel = out.get(timeout=30)
        sender_spans: Spans = {}
        _time_calls(ops, "push", "push", sender_spans)
        sends: list[tuple[float, float]] = []
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) if datagram else None

        async def send() -> None:
            layer = ChannelLayer(driver="sqlite", path=path)
            due = time.monotonic()
            for i in range(-warmup, messages):
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                sent = time.monotonic()
                await layer.send(channel, {"type": "probe.msg", "i": i, "t": sent})
                if sock is not None and address is not None:
                    sock.sendto(_STAMP.pack(i, sent) + b"x" * 60, address)
                if i >= 0:
                    sends.append((sent, time.monotonic()))
                due += 1 / rate
            await layer.send(channel, {"type": "probe.stop"})
            await layer.close()

        asyncio.run(send())
        received, spans, datagrams = out.get(timeout=60)
        child.join()
        if sock is not None:
            sock.close()

    # A push that found the file locked is tried again (the receiver writes too: its claims,
    # or the removals after its peeks), so pushes are matched to sends by time: the attempts
    # within one send() call, the last of them the one that committed.
    pushes = sorted(sender_spans["push"])
    push_starts = [start for start, _ in pushes]
    events = sorted(start for start, _ in spans.get("inotify", []))
    claims = sorted(spans.get("claim", []))
    to_push, push_txn, to_event, to_claim, claim_txn, to_return = [], [], [], [], [], []
    for (sent, returned), (_, _, got) in zip(sends, received, strict=True):
        first = bisect.bisect_left(push_starts, sent)
        last = bisect.bisect_right(push_starts, returned) - 1
        if last < first:
            continue
        push_start, push_end = pushes[last]
        to_push.append(pushes[first][0] - sent)
        push_txn.append(push_end - push_start)
        k = bisect.bisect_left(events, push_end)
        if k == len(events):
            continue
        to_event.append(events[k] - push_end)
        j = bisect.bisect_left(claims, (events[k], 0.0))
        if j == len(claims) or claims[j][1] > got:
            continue
        to_claim.append(claims[j][0] - events[k])
        claim_txn.append(claims[j][1] - claims[j][0])
        to_return.append(got - claims[j][1])
    total = [got - sent for _, sent, got in received]
    rows = [
        ("send() called -> push transaction starts", _median_us(to_push)),
        ("push transaction", _median_us(push_txn)),
        ("commit -> receiver's inotify reader runs", _median_us(to_event)),
        ("reader runs -> claim (or peek) starts", _median_us(to_claim)),
        ("claim (or peek) transaction", _median_us(claim_txn)),
        ("claim (or peek) ends -> the awaiting code has the message", _median_us(to_return)),
        ("end to end (p50)", _median_us(total)),
    ]
    if datagram:
        rows.append(
            (
                "datagram sent after send() returned: arrival (p50)",
                _median_us(list(datagrams.values())),
            )
        )
    width = max(len(label) for label, _ in rows)
    print(f"{messages:,} messages at {rate:g} msg/s, medians")
    for label, value in rows:
        print(f"  {label:<{width}}  {value:>10}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument(
        "--datagram", action="store_true", help="also time a datagram hand-off bound"
    )
    args = parser.parse_args()
    probe(args.messages, args.rate, args.datagram)


if __name__ == "__main__":
    main()
