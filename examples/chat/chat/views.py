"""Two pages: the room list and a room. Each says which worker process rendered it."""

from __future__ import annotations

import os

from django.conf import settings
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render

from .rooms import is_valid_room


def index(request: HttpRequest) -> HttpResponse:
    error = None
    wanted = request.GET.get("room")
    if wanted is not None:
        room = wanted.strip().lower()
        if is_valid_room(room):
            return redirect("room", room=room)
        error = "Room names use lower-case letters, digits, - and _ (at most 40)."
    context = {"rooms": settings.CHAT_ROOMS, "pid": os.getpid(), "error": error}
    return render(request, "chat/index.html", context)


def room(request: HttpRequest, room: str) -> HttpResponse:
    if not is_valid_room(room):
        raise Http404("no such room")
    context = {"room": room, "rooms": settings.CHAT_ROOMS, "pid": os.getpid()}
    return render(request, "chat/room.html", context)
