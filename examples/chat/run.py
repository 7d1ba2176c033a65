"""Start the example chat: one uvicorn server, two worker processes, channels-lite in between.

    uv run python examples/chat/run.py            # http://127.0.0.1:8000/
    uv run python examples/chat/run.py --port 0   # any free port; the URL printed says which

The workers share nothing but the SQLite file of the zero-configuration layer
(``channels-lite.sqlite3`` in ``examples/chat/``, or in ``--data-dir``/``$CHAT_DATA_DIR``).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

import uvicorn

HERE = Path(__file__).resolve().parent
HOST = "127.0.0.1"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8000, help="TCP port; 0 picks a free one")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="directory of the layer's SQLite file (default $CHAT_DATA_DIR or examples/chat)",
    )
    parser.add_argument("--log-level", default="info", help="uvicorn log level")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")

    if args.data_dir is not None:
        os.environ["CHAT_DATA_DIR"] = str(args.data_dir.resolve())
    data_dir = Path(os.environ.get("CHAT_DATA_DIR") or HERE)
    data_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatproject.settings")

    # Bind here, not in uvicorn, so that --port 0 still tells us which port to print.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((HOST, args.port))
    except OSError as exc:
        parser.exit(1, f"cannot listen on {HOST}:{args.port}: {exc}\n")
    sock.set_inheritable(True)
    port = sock.getsockname()[1]

    print(f"channels-lite example chat: {args.workers} worker processes on {HOST}:{port}")
    print(f"channel layer: SQLite at {data_dir / 'channels-lite.sqlite3'}")
    print(f"Open http://{HOST}:{port}/ in two browser tabs (Ctrl+C to stop)", flush=True)
    uvicorn.run(
        "chatproject.asgi:application",
        fd=sock.fileno(),
        workers=args.workers,
        app_dir=str(HERE),
        lifespan="on",
        log_level=args.log_level,
    )
    sock.close()


if __name__ == "__main__":
    sys.exit(main())
