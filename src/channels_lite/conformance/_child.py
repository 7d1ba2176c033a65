"""A worker process for the cross-process driver tests (``python -m ...conformance._child``).

Protocol on stdin/stdout, one line each: the parent sends a JSON request; the child opens the
driver and answers ``ready``; the parent sends ``go``; the child does its work and answers one
JSON line with the result, then exits.

Requests (besides ``driver`` and ``options``):

- ``{"op": "claim", "key": K, "limit": N, "now": T}``: claim until the key runs dry; answer
  the claimed payloads as hex strings, in order.
- ``{"op": "push", "channel": C, "count": N, "capacity": M, "now": T, "expires_at": E,
  "tag": S}``: push ``N`` single envelopes; answer the list of flags.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from channels_lite.drivers.base import ClaimRequest, Envelope
from channels_lite.drivers.registry import get_driver_class


def _write(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def _main() -> None:
    request: dict[str, Any] = json.loads(sys.stdin.readline())
    driver = get_driver_class(request["driver"])(**request["options"])
    await driver.open()
    try:
        _write("ready")
        go = await asyncio.to_thread(sys.stdin.readline)
        if go.strip() != "go":
            return
        op = request["op"]
        now = float(request["now"])
        if op == "claim":
            claimed: list[str] = []
            empty_rounds = 0
            # A few empty rounds in a row: the parent may still be pushing.
            while empty_rounds < int(request.get("patience", 1)):
                got = await driver.claim(
                    [ClaimRequest(key=request["key"], limit=int(request["limit"]))], now
                )
                if got:
                    empty_rounds = 0
                    claimed.extend(item.payload.hex() for item in got)
                else:
                    empty_rounds += 1
                    await asyncio.sleep(0)
            _write(json.dumps(claimed))
        elif op == "push":
            flags: list[bool] = []
            for index in range(int(request["count"])):
                payload = f"{request['tag']}-{index}".encode()
                envelope = Envelope(
                    channel=request["channel"],
                    key=request["channel"],
                    payload=payload,
                    expires_at=float(request["expires_at"]),
                    capacity=int(request["capacity"]),
                )
                flags.extend(await driver.push([envelope], now))
            _write(json.dumps(flags))
        else:
            raise ValueError(f"unknown op {op!r}")
    finally:
        await driver.close()


if __name__ == "__main__":
    asyncio.run(_main())
