"""Settings of the example chat: Django + Channels on channels-lite's zero-configuration default.

The channel layer needs no CONFIG: it keeps its messages in an SQLite file at
``BASE_DIR / "channels-lite.sqlite3"``, which every worker process of the server shares.
``CHAT_DATA_DIR`` moves that file elsewhere (the end-to-end tests point it at a temporary
directory). Django's own database is not used: the chat stores nothing, presence included.
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parent.parent

# channels-lite puts its SQLite file in BASE_DIR; nothing else here reads BASE_DIR.
BASE_DIR = Path(os.environ.get("CHAT_DATA_DIR") or PROJECT_DIR)

CHANNEL_LAYERS = {"default": {"BACKEND": "channels_lite.ChannelLayer"}}

# An example, not a deployment: a fixed key is fine for a server bound to 127.0.0.1.
SECRET_KEY = os.environ.get("CHAT_SECRET_KEY", "channels-lite-example-chat-not-secret")
DEBUG = os.environ.get("CHAT_DEBUG", "1") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "[::1]"]

INSTALLED_APPS = ["django.contrib.staticfiles", "chat"]
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]
ROOT_URLCONF = "chatproject.urls"
ASGI_APPLICATION = "chatproject.asgi.application"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {"context_processors": ["django.template.context_processors.request"]},
    }
]
DATABASES: dict[str, dict[str, object]] = {}
STATIC_URL = "static/"
USE_TZ = True

# The rooms listed on the home page; any other valid name works too (/room/<name>/).
CHAT_ROOMS = ["lobby", "python", "django", "random"]

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {
        "channels_lite": {"handlers": ["console"], "level": "INFO"},
        "chat": {"handlers": ["console"], "level": "INFO"},
    },
}
