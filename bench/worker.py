"""Run one scenario for channels-lite 0.4 inside its own venv: ``python -m bench.worker JSON``.

Prints the metrics as one JSON line on stdout (see :mod:`bench.legacy`).
"""

from __future__ import annotations

import json
import logging
import os
import sys

from bench import legacy
from bench.catalog import BY_KEY, RunContext
from bench.layers import LAYERS
from bench.sizes import Sizes

logger = logging.getLogger("bench.worker")


def main() -> int:
    request = json.loads(sys.argv[1])
    sizes = Sizes(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in request["sizes"].items()}
    )
    config = request["config"]
    counter = iter(range(1, 1_000_000))

    def fresh() -> dict[str, object]:
        new = {**config, "path": f"{config['path']}.{next(counter)}"}
        legacy.migrate(new)
        return new

    legacy.migrate(config)
    ctx = RunContext(sizes, lambda: None, fresh)
    metrics = BY_KEY[request["scenario"]].run(LAYERS["lite-0.4"], config, ctx)
    sys.stdout.write(json.dumps(metrics) + "\n")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    try:
        code = main()
    except Exception:
        logger.exception("bench.worker failed")
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    # 0.4 may leave aiosqlite threads behind (see legacy.close); they must not hold the exit.
    os._exit(code)
