"""ASGI entry point: HTTP pages and static files, the chat WebSocket, and a lifespan handler."""

from __future__ import annotations

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatproject.settings")

from django.core.asgi import get_asgi_application

django_asgi_app = get_asgi_application()  # set Django up before importing consumers

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler  # noqa: E402

from chat.lifespan import Lifespan  # noqa: E402
from chat.routing import websocket_urlpatterns  # noqa: E402

application = ProtocolTypeRouter(
    {
        # uvicorn serves no files itself: Django's static handler serves /static/.
        "http": ASGIStaticFilesHandler(django_asgi_app),
        "websocket": AllowedHostsOriginValidator(URLRouter(websocket_urlpatterns)),
        "lifespan": Lifespan(),
    }
)
