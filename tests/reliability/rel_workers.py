"""What the child processes of the reliability tests run (spawned: a fresh interpreter each).

Kept free of pytest so that a child imports only asyncio, Channels and channels-lite. Each
child writes its :class:`~rel_ledger.Ledger` as it goes (it may be ``kill -9``-ed at any
moment), talks to the parent through two multiprocessing queues (``events`` up, ``commands``
down) and returns a small report at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import random
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from multiprocessing.queues import Queue
from typing import Any

from channels.exceptions import ChannelFull

from channels_lite import ChannelLayer
from channels_lite.drivers.base import DriverError

# Spawned children import this module by name: make its siblings importable too.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from rel_ledger import Ledger, memory_kb

#: A failure guard only: a child that is not done by then reports an error.
GUARD = 900.0

ChildFn = Callable[..., Awaitable[Any]]


def child_main(
    fn: ChildFn, events: Queue[Any], commands: Queue[Any] | None, tag: str, args: tuple[Any, ...]
) -> None:
    """Entry point of every child: run ``fn(Child(...), *args)`` and report its outcome."""
    logging.basicConfig(level=logging.WARNING, format=f"[{tag} %(levelname)s %(name)s] %(message)s")
    child = Child(tag, events, commands)
    try:
        value = asyncio.run(asyncio.wait_for(fn(child, *args), GUARD))
    except BaseException:
        events.put(("error", tag, traceback.format_exc()))
        raise SystemExit(1) from None
    events.put(("done", tag, value))


class LogTap(logging.Handler):
    """Keeps this process's WARNING+ records (the parent checks what was logged)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(f"{record.levelname} {record.name}: {record.getMessage()}")


class Child:
    """The child's side of the conversation with the parent."""

    def __init__(self, tag: str, events: Queue[Any], commands: Queue[Any] | None) -> None:
        self.tag = tag
        self.events = events
        self.commands = commands
        self.log = LogTap()
        logging.getLogger().addHandler(self.log)

    def tell(self, kind: str, value: Any = None) -> None:
        self.events.put((kind, self.tag, value))

    def poll(self) -> Any | None:
        """The next command, or None when there is none yet."""
        assert self.commands is not None
        try:
            return self.commands.get_nowait()
        except queue.Empty:
            return None

    async def command(self, timeout: float = GUARD) -> Any:
        """Wait for the next command without blocking the event loop."""
        deadline = time.monotonic() + timeout
        while (got := self.poll()) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.tag}: no command from the parent in {timeout}s")
            await asyncio.sleep(0.02)
        return got


async def _record_memory(ledger: Ledger, every: float = 2.0) -> None:
    while True:
        rss, hwm = memory_kb()
        ledger.write("mem", rss=rss, hwm=hwm)
        await asyncio.sleep(every)


# =============================================================================== stress


@dataclass(frozen=True)
class StressPlan:
    path: str
    ledger_dir: str
    config: dict[str, Any] = field(default_factory=dict)
    normal: tuple[str, ...] = ("stress.n0", "stress.n1")
    fifo: str = "stress.fifo"
    groups: tuple[str, ...] = ("stress.g0", "stress.g1")
    specific_per_process: int = 2
    connection_slots: int = 2
    sender_tasks: int = 2
    send_pause: float = 0.004
    #: Receive timeouts (each one cancels a receive) are drawn up to this many seconds.
    cancel_after: float = 0.25
    connection_life: tuple[float, float] = (0.3, 2.0)
    idle_to_finish: float = 1.0
    large_every: int = 200
    large_size: int = 256 * 1024
    seed: int = 0


class _Stress:
    def __init__(self, child: Child, plan: StressPlan, reads_fifo: bool) -> None:
        self.child = child
        self.plan = plan
        self.reads_fifo = reads_fifo
        self.rng = random.Random(f"{plan.seed}-{child.tag}")
        self.ledger = Ledger(plan.ledger_dir, child.tag)
        self.layer = ChannelLayer(driver="sqlite", path=plan.path, **plan.config)
        self.targets: list[str] = []
        self.sending = False
        self.stop_sending = asyncio.Event()
        self.draining = asyncio.Event()
        self.last_activity = time.monotonic()
        self.counts = {"sent": 0, "group_sent": 0, "received": 0, "cancelled": 0, "full": 0}

    # -- receiving ------------------------------------------------------------------------

    def _got(self, channel: str, message: dict[str, Any], group: str | None = None) -> None:
        self.last_activity = time.monotonic()
        self.counts["received"] += 1
        if group is None:
            assert message.get("ch") == channel, f"{channel} got a message for {message.get('ch')}"
            self.ledger.write("recv", id=message["id"], ch=channel, s=message["s"], q=message["q"])
        else:
            assert message.get("g") == group, f"{channel} in {group} got {message.get('g')}"
            self.ledger.write("grecv", id=message["id"], ch=channel, s=message["s"], q=message["q"])

    def _idle(self) -> bool:
        return (
            self.draining.is_set()
            and time.monotonic() - self.last_activity > self.plan.idle_to_finish
        )

    async def consume(self, channel: str, *, cancel: bool, group: str | None = None) -> None:
        """Read ``channel`` until drained; with ``cancel``, every receive may time out."""
        cancels = 0
        try:
            while not self._idle():
                timeout = self.rng.uniform(0.002, self.plan.cancel_after) if cancel else 0.5
                try:
                    message = await asyncio.wait_for(self.layer.receive(channel), timeout)
                except TimeoutError:
                    cancels += 1
                    continue
                if message.get("type") == "stress.end":
                    return
                self._got(channel, message, group)
        finally:
            self.ledger.write("cancel", n=cancels)
            self.counts["cancelled"] += cancels

    async def fifo_reader(self) -> None:
        """The one reader of the FIFO channel: never cancelled, stops at the parent's marker."""
        while True:
            message = await self.layer.receive(self.plan.fifo)
            if message.get("type") == "stress.end":
                return
            self._got(self.plan.fifo, message)

    async def connections(self, slot: int) -> None:
        """Consumers connecting and disconnecting: join a group, read a while, leave."""
        while not self.draining.is_set():
            group = self.rng.choice(self.plan.groups)
            channel = await self.layer.new_channel("conn")
            self.ledger.write("channel", ch=channel, conn=True, g=group)
            await self.layer.group_add(group, channel)
            life = self.rng.uniform(*self.plan.connection_life)
            ends = time.monotonic() + life
            cancels = 0
            while time.monotonic() < ends and not self.draining.is_set():
                timeout = min(self.rng.uniform(0.002, self.plan.cancel_after), life)
                try:
                    message = await asyncio.wait_for(self.layer.receive(channel), timeout)
                except TimeoutError:
                    cancels += 1
                    continue
                self._got(channel, message, group)
            # Disconnect, as a Channels consumer does: its pending receive was cancelled (by
            # the timeout above), then it leaves the group.
            await self.layer.group_discard(group, channel)
            self.ledger.write("cancel", n=cancels)
            self.counts["cancelled"] += cancels

    # -- sending --------------------------------------------------------------------------

    def _pad(self, number: int) -> bytes:
        if self.plan.large_every and number % self.plan.large_every == self.plan.large_every - 1:
            return self.rng.randbytes(self.plan.large_size)
        return self.rng.randbytes(self.rng.randrange(0, 512))

    async def sender(self, index: int) -> None:
        sender = f"{self.child.tag}/{index}"
        seq = 0
        kinds = ["normal"] * 35 + ["fifo"] * 10 + ["specific"] * 35 + ["group"] * 20
        while not self.stop_sending.is_set():
            seq += 1
            ident = f"{sender}:{seq}"
            kind = self.rng.choice(kinds)
            if kind == "specific" and not self.targets:
                kind = "normal"
            message: dict[str, Any] = {
                "type": "stress.msg",
                "id": ident,
                "s": sender,
                "q": seq,
                "pad": self._pad(seq),
            }
            try:
                if kind == "group":
                    group = self.rng.choice(self.plan.groups)
                    message["g"] = group
                    self.ledger.write("gtry", id=ident, g=group, s=sender, q=seq)
                    await self.layer.group_send(group, message)
                    self.ledger.write("gsent", id=ident)
                    self.counts["group_sent"] += 1
                else:
                    if kind == "normal":
                        channel = self.rng.choice(self.plan.normal)
                    elif kind == "fifo":
                        channel = self.plan.fifo
                    else:
                        channel = self.rng.choice(self.targets)
                    message["ch"] = channel
                    self.ledger.write("try", id=ident, ch=channel, s=sender, q=seq)
                    try:
                        await self.layer.send(channel, message)
                    except ChannelFull:
                        self.ledger.write("full", id=ident)
                        self.counts["full"] += 1
                    else:
                        self.ledger.write("sent", id=ident)
                        self.counts["sent"] += 1
            except DriverError as exc:
                # Only under injected faults; the record says it was not accepted.
                self.ledger.write("error", id=ident, err=str(exc)[:200])
            await asyncio.sleep(self.rng.uniform(0, self.plan.send_pause))

    # -- the conversation with the parent -------------------------------------------------

    async def listen(self) -> None:
        while True:
            command = await self.child.command()
            kind = command[0]
            if kind == "targets":
                self.targets = list(command[1])
                if not self.sending:
                    self.sending = True
                    self.sender_tasks = [
                        asyncio.create_task(self.sender(index))
                        for index in range(self.plan.sender_tasks)
                    ]
            elif kind == "stop_sending":
                self.stop_sending.set()
                await asyncio.gather(*self.sender_tasks)
                self.child.tell("sent", dict(self.counts))
            elif kind == "drain":
                self.last_activity = time.monotonic()
                self.draining.set()
                return

    async def run(self) -> dict[str, Any]:
        self.sender_tasks: list[asyncio.Task[None]] = []
        memory = asyncio.create_task(_record_memory(self.ledger))
        names = []
        for _ in range(self.plan.specific_per_process):
            channel = await self.layer.new_channel("stress")
            self.ledger.write("channel", ch=channel)
            names.append(channel)
        consumers = [
            asyncio.create_task(self.consume(ch, cancel=True)) for ch in (*self.plan.normal, *names)
        ]
        if self.reads_fifo:
            consumers.append(asyncio.create_task(self.fifo_reader()))
        consumers += [
            asyncio.create_task(self.connections(slot))
            for slot in range(self.plan.connection_slots)
        ]
        self.child.tell("hello", names)
        await self.listen()
        await asyncio.gather(*consumers)
        memory.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await memory
        await self.layer.close()
        rss, hwm = memory_kb()
        self.ledger.write("mem", rss=rss, hwm=hwm)
        self.ledger.close()
        return dict(self.counts, hwm_kb=hwm)


async def stress_worker(child: Child, plan: StressPlan, reads_fifo: bool) -> dict[str, Any]:
    return await _Stress(child, plan, reads_fifo).run()


# =============================================================================== faults


async def paced_sender(
    child: Child, path: str, ledger_dir: str, channel: str, count: int, pause: float
) -> int:
    """Send ``count`` messages to ``channel`` one by one, recording each in the ledger."""
    ledger = Ledger(ledger_dir, child.tag)
    layer = ChannelLayer(driver="sqlite", path=path, capacity=100_000)
    for seq in range(1, count + 1):
        ident = f"{child.tag}:{seq}"
        ledger.write("try", id=ident, ch=channel, s=child.tag, q=seq)
        await layer.send(channel, {"id": ident, "s": child.tag, "q": seq, "ch": channel})
        ledger.write("sent", id=ident)
        child.tell("progress", seq)
        await asyncio.sleep(pause)
    await layer.close()
    return count


async def plain_receiver(
    child: Child, path: str, ledger_dir: str, channel: str, idle: float
) -> int:
    """Receive ``channel`` one message at a time, never cancelling a receive, until the parent
    says ``drain`` and nothing came for ``idle`` seconds."""
    ledger = Ledger(ledger_dir, child.tag)
    layer = ChannelLayer(driver="sqlite", path=path, capacity=100_000)
    got = 0
    draining = False
    last = time.monotonic()
    pending: asyncio.Future[dict[str, Any]] | None = None
    child.tell("ready")
    while True:
        if pending is None:
            pending = asyncio.ensure_future(layer.receive(channel))
        done, _ = await asyncio.wait({pending}, timeout=0.05)
        if done:
            message = pending.result()
            pending = None
            ledger.write("recv", id=message["id"], ch=channel, s=message["s"], q=message["q"])
            got += 1
            last = time.monotonic()
            child.tell("progress", got)
            continue
        if not draining and child.poll() == "drain":
            draining = True
            last = time.monotonic()
        if draining and time.monotonic() - last > idle:
            pending.cancel()  # the only cancellation: a claimed message goes back to storage
            with contextlib.suppress(asyncio.CancelledError):
                await pending
            break
    await layer.close()
    return got


# ======================================================================= dead processes


async def group_member(
    child: Child,
    path: str,
    groups: list[str],
    process_timeout: float,
    channels: int,
    lock_timeout: float = 5.0,
) -> dict[str, Any]:
    """Make ``channels`` channels, put each in every group, report them, then idle with a free
    event loop, answering the parent's commands."""
    layer = ChannelLayer(
        driver="sqlite", path=path, process_timeout=process_timeout, timeout=lock_timeout
    )
    names = [await layer.new_channel("member") for _ in range(channels)]
    for name in names:
        for group in groups:
            await layer.group_add(group, name)
    child.tell("members", {"channels": names, "key": layer._process_key, "pid": os.getpid()})
    received: list[dict[str, Any]] = []
    while True:
        command = await child.command()
        if command == "receive":
            received.append(await asyncio.wait_for(layer.receive(names[0]), 30))
            child.tell("received", received[-1])
        elif command == "stop":
            break
    await layer.close()
    return {"received": received, "log": child.log.records}


# ======================================================================= deleted file


async def ghost_holder(child: Child, path: str) -> dict[str, Any]:
    """Use the database, then keep a consumer waiting while the parent deletes the file."""
    layer = ChannelLayer(driver="sqlite", path=path)
    channel = await layer.new_channel("ghost")
    await layer.group_add("deleted.room", channel)
    await layer.send("deleted.work", {"n": "before-1"})
    await layer.send("deleted.work", {"n": "before-2"})
    child.tell("ready", channel)
    waiting = asyncio.create_task(layer.receive(channel))
    while not any("deleted or replaced" in line for line in child.log.records):
        if child.poll() == "poke":
            # Any use of the layer notices the file is gone.
            await layer.group_add("deleted.room", channel)
        await asyncio.sleep(0.01)
    child.tell("moved", child.log.records)
    got = await asyncio.wait_for(waiting, 30)
    await layer.send("deleted.work", {"n": "after-from-holder"})
    child.tell("got", got)
    while (command := await child.command()) != "stop":
        assert command == "poke", command
    await layer.close()
    return {"log": child.log.records}
