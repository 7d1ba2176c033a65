"""Turning messages into bytes and back: validation, serializers, optional encryption.

Serialization happens once per ``send``/``group_send``; the receiver always gets a fresh object
(Channels requires that the receiver never shares objects with the sender).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import msgpack

from .errors import ConfigurationError

logger = logging.getLogger("channels_lite.core.codec")

RESERVED_KEY = "__asgi_channel__"
_INT64_MIN = -(2**63)
_UINT64_MAX = 2**64 - 1
_BIGINT_EXT = 1  # msgpack ext type carrying ints outside 64 bits as signed big-endian bytes


class Serializer(Protocol):
    """What a custom serializer provides; register it with :func:`register_serializer`."""

    def dumps(self, message: dict[str, Any]) -> bytes: ...

    def loads(self, data: bytes) -> dict[str, Any]: ...


def check_message(message: object) -> dict[str, Any]:
    """Refuse what Channels forbids before anything is stored, naming the offending value.

    Plain raises (not ``assert``) so ``python -O`` keeps the checks.
    """
    if not isinstance(message, dict):
        raise TypeError(f"A message must be a dict, not {type(message).__name__}")
    if RESERVED_KEY in message:
        raise ValueError(f"A message may not contain the reserved key {RESERVED_KEY!r}")
    try:
        if not _plain(message):
            _check_value(message, "message")
    except RecursionError:
        raise TypeError(
            "message is nested too deeply to be carried (hundreds of levels of lists or dicts)"
        ) from None
    return message


#: Leaf types a message carries as they are; their subclasses take the slow walk.
_LEAVES = frozenset({str, bytes, bool, float, int, type(None)})


def _plain(value: object) -> bool:
    """True when ``value`` holds only exact leaf types, str-keyed dicts, lists and tuples.

    Every send walks its message: this walk builds no path strings (on a process that has
    just woken up, the paths of a small message cost more than its serialization). False
    sends the message through :func:`_check_value`, which accepts subclasses too and names
    the offending value.
    """
    kind = type(value)
    if kind in _LEAVES:
        return True
    if type(value) is dict:
        for key, item in value.items():
            if type(key) is not str:
                return False
            if type(item) not in _LEAVES and not _plain(item):
                return False
        return True
    if type(value) is list or type(value) is tuple:
        return all(type(item) in _LEAVES or _plain(item) for item in value)
    return False


def _check_value(value: object, path: str) -> None:
    # Iterative would be faster for pathological depth, but messages are shallow and the
    # recursion gives exact paths in errors, which is what users need.
    if value is None or isinstance(value, str | bytes | bool | float):
        return
    if isinstance(value, int):
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(
                    f"{path} has a key of type {type(key).__name__} ({key!r}); "
                    "message dict keys must be str"
                )
            _check_value(item, f"{path}[{key!r}]")
        return
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _check_value(item, f"{path}[{index}]")
        return
    raise TypeError(
        f"{path} is a {type(value).__name__} ({value!r:.60}), which a channel layer cannot carry: "
        "use str, bytes, int, float, bool, None, list, tuple or dict with str keys"
    )


def _msgpack_default(obj: object) -> msgpack.ExtType:
    if isinstance(obj, int):
        length = (obj.bit_length() + 8) // 8
        return msgpack.ExtType(_BIGINT_EXT, obj.to_bytes(length, "big", signed=True))
    raise TypeError(f"cannot serialize {type(obj).__name__}")


def _msgpack_ext(code: int, data: bytes) -> object:
    if code == _BIGINT_EXT:
        return int.from_bytes(data, "big", signed=True)
    return msgpack.ExtType(code, data)


class MsgpackSerializer:
    """The default: compact, keeps bytes and str apart, carries ints of any size."""

    def dumps(self, message: dict[str, Any]) -> bytes:
        data: bytes = msgpack.packb(message, use_bin_type=True, default=_msgpack_default)
        return data

    def loads(self, data: bytes) -> dict[str, Any]:
        result: dict[str, Any] = msgpack.unpackb(
            data, raw=False, ext_hook=_msgpack_ext, strict_map_key=True
        )
        return result


_BYTES_TAG = "\x00bytes"


def _json_default(obj: object) -> object:
    if isinstance(obj, bytes):
        return {_BYTES_TAG: base64.b64encode(obj).decode("ascii")}
    raise TypeError(f"cannot serialize {type(obj).__name__}")


def _json_hook(obj: dict[str, Any]) -> object:
    if len(obj) == 1 and _BYTES_TAG in obj:
        return base64.b64decode(obj[_BYTES_TAG])
    return obj


def _reject_tag(value: object, path: str) -> None:
    if isinstance(value, dict):
        if _BYTES_TAG in value:
            raise ValueError(
                f"{path} holds the key {_BYTES_TAG!r}, which the json serializer reserves "
                "for bytes; use serializer_format='msgpack' to send such keys"
            )
        for key, item in value.items():
            _reject_tag(item, f"{path}[{key!r}]")
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _reject_tag(item, f"{path}[{index}]")


class JSONSerializer:
    """Readable storage; bytes travel as ``{"\\x00bytes": base64}``, a key refused in messages."""

    def dumps(self, message: dict[str, Any]) -> bytes:
        _reject_tag(message, "message")
        return json.dumps(message, default=_json_default, separators=(",", ":")).encode()

    def loads(self, data: bytes) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(data, object_hook=_json_hook)
        return result


_SERIALIZERS: dict[str, Callable[[], Serializer]] = {
    "msgpack": MsgpackSerializer,
    "json": JSONSerializer,
}


def register_serializer(name: str, factory: Callable[[], Serializer]) -> None:
    """Make ``serializer_format=name`` available. Registering a taken name replaces it.

    Checked here, not when a layer is built: one bad registration must not break every
    layer of the process (the registry is process-wide).
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"a serializer's name must be a non-empty str, not {name!r}")
    if not callable(factory):
        raise TypeError(
            f"serializer {name!r}: the factory must be callable (returning an object with "
            f"dumps() and loads()), not {factory!r}"
        )
    _SERIALIZERS[name] = factory


def serializer_names() -> list[str]:
    return sorted(_SERIALIZERS)


def make_serializer(name: str) -> Serializer:
    serializer = _SERIALIZERS[name]()
    if not (
        callable(getattr(serializer, "dumps", None))
        and callable(getattr(serializer, "loads", None))
    ):
        raise ConfigurationError(
            "serializer_format",
            f"serializer_format {name!r}: its registered factory returned {serializer!r}, "
            "which has no dumps() and loads() methods",
        )
    return serializer


class DecodeError(Exception):
    """A stored payload could not be decrypted or deserialized; it is not delivered."""


class Codec:
    """Serializer plus optional authenticated encryption (Fernet, with key rotation).

    Keys are derived as channels_redis derives them (SHA-256 of the key string), so a
    ``symmetric_encryption_keys`` list carries over unchanged. The first key encrypts; every key
    decrypts, which is how rotation works.
    """

    def __init__(
        self,
        serializer: Serializer,
        encryption_keys: Sequence[str] = (),
        max_message_size: int | None = None,
    ) -> None:
        self.serializer = serializer
        self.max_message_size = max_message_size
        self._crypter: Any = None
        if encryption_keys:
            from cryptography.fernet import Fernet, MultiFernet

            fernets = [
                Fernet(base64.urlsafe_b64encode(hashlib.sha256(key.encode()).digest()))
                for key in encryption_keys
            ]
            self._crypter = MultiFernet(fernets)

    @property
    def encrypted(self) -> bool:
        return self._crypter is not None

    def encode(self, message: dict[str, Any]) -> bytes:
        """Validate and serialize; raises ``TypeError``/``ValueError``, nothing else."""
        check_message(message)
        try:
            data = self.serializer.dumps(message)
        except (TypeError, ValueError, OverflowError) as exc:
            raise TypeError(f"message could not be serialized: {exc}") from exc
        if self._crypter is not None:
            data = self._crypter.encrypt(data)
        return data

    def decode(self, data: bytes) -> dict[str, Any]:
        if self._crypter is not None:
            from cryptography.fernet import InvalidToken

            try:
                data = self._crypter.decrypt(data)
            except InvalidToken as exc:
                raise DecodeError(
                    "message failed authentication: it was encrypted with a key not in "
                    "symmetric_encryption_keys, or tampered with"
                ) from exc
        try:
            return self.serializer.loads(data)
        except (ValueError, TypeError) as exc:
            raise DecodeError(f"stored message could not be deserialized: {exc}") from exc
