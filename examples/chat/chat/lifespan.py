"""ASGI lifespan: log which layer a worker uses, and close the layer when the worker stops."""

from __future__ import annotations

import logging
import os
from typing import Any

from channels.layers import get_channel_layer

logger = logging.getLogger("chat")


class Lifespan:
    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                logger.info(
                    "worker pid %d ready; channel layer %r", os.getpid(), get_channel_layer()
                )
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                layer = get_channel_layer()
                if layer is not None:
                    # Releases this process's channels at once instead of after process_timeout.
                    await layer.close()
                await send({"type": "lifespan.shutdown.complete"})
                return
