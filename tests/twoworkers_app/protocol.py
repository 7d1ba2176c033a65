"""What the test sends to the app besides chat text (importable without Django)."""

#: ``BLOCK + "<seconds>"``: the worker serving this client blocks its event loop that long.
BLOCK = "__block__:"
