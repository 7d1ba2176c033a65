"""Settings of the two-worker test project: the zero-configuration channels-lite layer.

``BASE_DIR`` comes from ``CHANNELS_LITE_TEST_BASE_DIR`` so that each test run gets its own
directory, and with it its own ``channels-lite.sqlite3`` shared by both workers.
"""

from __future__ import annotations

import os
from pathlib import Path

BASE_DIR = Path(os.environ["CHANNELS_LITE_TEST_BASE_DIR"])
SECRET_KEY = "channels-lite-two-workers-test"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
INSTALLED_APPS: list[str] = []
USE_TZ = True
ASGI_APPLICATION = "twoworkers_app.asgi.application"
CHANNEL_LAYERS = {"default": {"BACKEND": "channels_lite.ChannelLayer"}}
