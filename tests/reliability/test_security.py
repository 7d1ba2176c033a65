"""Security: owner-only files, authenticated encryption at rest, key rotation, and a code audit
(no pickle or eval, SQL only parameterized). SECURITY.md states the threat model.
"""

from __future__ import annotations

import ast
import asyncio
import base64
import hashlib
import logging
import os
import re
import sqlite3
import stat
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet, InvalidToken

from channels_lite import ChannelLayer

SRC = Path(__file__).resolve().parents[2] / "src" / "channels_lite"
GUARD = 30.0
posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def drain(layer: ChannelLayer, channel: str) -> list[dict[str, Any]]:
    got = []
    while True:
        try:
            got.append(await asyncio.wait_for(layer.receive(channel), 0.3))
        except TimeoutError:
            return got


def stored_payloads(path: Path) -> list[tuple[int, bytes]]:
    conn = sqlite3.connect(path)
    try:
        return [
            (row_id, bytes(payload))
            for row_id, payload in conn.execute(
                "SELECT id, payload FROM channels_lite_messages ORDER BY id"
            )
        ]
    finally:
        conn.close()


def replace_payload(path: Path, row_id: int, payload: bytes) -> None:
    conn = sqlite3.connect(path)
    try:
        conn.execute(
            "UPDATE channels_lite_messages SET payload = ? WHERE id = ?", (payload, row_id)
        )
        conn.commit()
    finally:
        conn.close()


# ==================================================================== file permissions


@posix_only
@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077])
async def test_database_and_wal_files_owner_only_under_any_umask(
    tmp_path: Path, umask: int
) -> None:
    """Whatever the umask, the database and its -wal/-shm are created 0600 (nobody else can
    read queued messages or group names); nothing else is left in the directory."""
    path = tmp_path / "private.sqlite3"
    old = os.umask(umask)
    try:
        layer = ChannelLayer(driver="sqlite", path=path)
        await layer.send("sec.c", {"secret": 1})
        await layer.group_add("sec.room", "sec.c")
        for name in ("private.sqlite3", "private.sqlite3-wal", "private.sqlite3-shm"):
            assert mode(tmp_path / name) == 0o600, (name, oct(mode(tmp_path / name)))
        assert sorted(p.name for p in tmp_path.iterdir()) == [
            "private.sqlite3",
            "private.sqlite3-shm",
            "private.sqlite3-wal",
        ]
        await layer.close()
    finally:
        os.umask(old)


@posix_only
async def test_group_shared_database_keeps_its_mode(tmp_path: Path) -> None:
    """Sharing between users (SECURITY.md): an existing file made 0660 for a group keeps its
    mode, and the -wal/-shm SQLite creates copy it (never world-readable)."""
    path = tmp_path / "shared.sqlite3"
    layer = ChannelLayer(driver="sqlite", path=path)
    await layer.send("sec.c", {"n": 1})
    await layer.close()
    for leftover in tmp_path.glob("shared.sqlite3-*"):
        leftover.unlink()
    path.chmod(0o660)
    old = os.umask(0o007)
    try:
        layer = ChannelLayer(driver="sqlite", path=path)
        assert await drain(layer, "sec.c") == [{"n": 1}]
        for name in ("shared.sqlite3", "shared.sqlite3-wal", "shared.sqlite3-shm"):
            assert mode(tmp_path / name) == 0o660, name
        await layer.close()
    finally:
        os.umask(old)


# ========================================================================== encryption


@pytest.fixture
async def layers(tmp_path: Path) -> Any:
    made: list[ChannelLayer] = []

    def make(**config: Any) -> ChannelLayer:
        layer = ChannelLayer(driver="sqlite", path=tmp_path / "enc.sqlite3", **config)
        made.append(layer)
        return layer

    yield make
    for layer in made:
        await layer.close()


async def test_payloads_unreadable_in_the_file(tmp_path: Path, layers: Any) -> None:
    """With keys, no byte of the message appears in the database file or its WAL."""
    layer = layers(symmetric_encryption_keys=["k1"])
    marker = "plaintext-marker-3f9a"
    await layer.send("sec.c", {"text": marker, "blob": marker.encode() * 3})
    for name in ("enc.sqlite3", "enc.sqlite3-wal"):
        data = (tmp_path / name).read_bytes()
        assert marker.encode() not in data, name
    # The channel name is not encrypted (SECURITY.md says so).
    assert b"sec.c" in (tmp_path / "enc.sqlite3-wal").read_bytes()


@pytest.mark.parametrize(
    "tamper",
    ["flip-a-byte", "truncate", "other-key", "plaintext", "empty"],
)
async def test_tampered_payload_rejected_logged_not_delivered(
    tmp_path: Path, layers: Any, caplog: pytest.LogCaptureFixture, tamper: str
) -> None:
    """Someone with write access changes a stored payload: the receiver refuses it (logged at
    ERROR, naming the channel and the cause, without the key or the plaintext) and goes on to
    the next message; the tampered one is never delivered."""
    caplog.set_level(logging.ERROR)
    layer = layers(symmetric_encryption_keys=["the-real-key"])
    await layer.send("sec.c", {"n": "tampered", "secret": "s3cr3t-value"})
    await layer.send("sec.c", {"n": "genuine"})
    path = tmp_path / "enc.sqlite3"
    (first_id, token), _ = stored_payloads(path)
    if tamper == "flip-a-byte":
        changed = bytearray(token)
        changed[len(changed) // 2] ^= 0x04
        forged = bytes(changed)
    elif tamper == "truncate":
        forged = token[: len(token) - 10]
    elif tamper == "other-key":
        other = Fernet(base64.urlsafe_b64encode(hashlib.sha256(b"attacker").digest()))
        forged = other.encrypt(b"\x81\xa1n\xa6forged")
    elif tamper == "plaintext":
        forged = b"\x81\xa1n\xa6forged"  # a valid msgpack message, not encrypted
    else:
        forged = b""
    replace_payload(path, first_id, forged)
    assert await asyncio.wait_for(layer.receive("sec.c"), GUARD) == {"n": "genuine"}
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors, "the dropped message was not logged"
    text = "\n".join(r.getMessage() for r in errors)
    assert "'sec.c'" in text
    assert "could not be decoded" in text
    assert "the-real-key" not in text
    assert "s3cr3t-value" not in text
    assert await drain(layer, "sec.c") == []


async def test_key_rotation(tmp_path: Path, layers: Any, caplog: pytest.LogCaptureFixture) -> None:
    """Rotation: deploy ``["new", "old"]`` everywhere, then drop "old". The first key
    encrypts; every key in the list decrypts; a reader that only knows the old key refuses
    (logs, does not deliver) what the new key encrypted."""
    caplog.set_level(logging.ERROR)
    old_only = layers(symmetric_encryption_keys=["old"])
    rotated = layers(symmetric_encryption_keys=["new", "old"])
    new_only = layers(symmetric_encryption_keys=["new"])
    await old_only.send("sec.c", {"by": "old"})
    assert await asyncio.wait_for(rotated.receive("sec.c"), GUARD) == {"by": "old"}
    await rotated.send("sec.c", {"by": "rotated"})
    # What the rotated layer stored is a Fernet token of the *new* key.
    ((_, token),) = stored_payloads(tmp_path / "enc.sqlite3")
    new_fernet = Fernet(base64.urlsafe_b64encode(hashlib.sha256(b"new").digest()))
    old_fernet = Fernet(base64.urlsafe_b64encode(hashlib.sha256(b"old").digest()))
    assert new_fernet.decrypt(token)
    with pytest.raises(InvalidToken):
        old_fernet.decrypt(token)
    assert await asyncio.wait_for(new_only.receive("sec.c"), GUARD) == {"by": "rotated"}
    await rotated.send("sec.c", {"by": "rotated-2"})
    await old_only.send("sec.c", {"by": "old-2"})
    # The old-key-only reader drops the new-key message and reads the next one.
    assert await asyncio.wait_for(old_only.receive("sec.c"), GUARD) == {"by": "old-2"}
    assert any("failed authentication" in r.getMessage() for r in caplog.records)


# ============================================================================ code audit


def _python_files() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def test_no_pickle_eval_or_exec() -> None:
    """Stored data is never unpickled or evaluated: no such module or builtin is used."""
    forbidden_modules = {"pickle", "cPickle", "marshal", "shelve", "dill", "cloudpickle", "yaml"}
    findings = []
    for path in _python_files():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [alias.name for alias in node.names]
                if isinstance(node, ast.ImportFrom) and node.module:
                    names.append(node.module)
                if {n.split(".")[0] for n in names} & forbidden_modules:
                    findings.append(f"{path}:{node.lineno} imports {names}")
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in {"eval", "exec", "compile", "__import__"}
            ):
                findings.append(f"{path}:{node.lineno} calls {node.func.id}()")
    assert findings == []


_SQL_START = re.compile(r"^\s*(SELECT|INSERT|DELETE|UPDATE|PRAGMA|CREATE|DROP|ALTER|WITH)\b", re.I)
_SQL_INSIDE = re.compile(r"\b(WHERE|VALUES|FROM)\b")
#: What may be interpolated into SQL text: identifiers built from the validated table_prefix
#: (a letter or _, then letters, digits or _; see SQLiteDriver) by the ``Tables`` objects
#: (``t``, ``tables``, or ``self`` inside them), "?" placeholders, and settings validated
#: against a fixed set. Never a value.
_ALLOWED = re.compile(
    r"^(?:(?:t|tables)\.\w+|self\.(?:meta|messages|groups|processes|schema|live_counts|push_one)"
    r"|p|table|clause|match"
    r"|_quote\((?:tables\.schema|self\.schema|self\.prefix \+ name|p \+ '\w+')\)"
    r"|', '\.join\('\?' \* len\(names\)\)"
    r"|self\.synchronous|_JOURNAL_SIZE_LIMIT|NOTE_PAYLOAD_MAX)$"
)


@pytest.mark.parametrize("driver", ["sqlite", "postgres"])
def test_sql_is_parameterized(driver: str) -> None:
    """Every SQL statement built with an f-string interpolates only identifiers derived from
    the validated table prefix, placeholder lists or enum-validated settings; values always
    travel as parameters."""
    findings = []
    checked = 0
    for path in sorted((SRC / "drivers" / driver).glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.JoinedStr):
                continue
            text = "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
            if not (_SQL_START.match(text) or (_SQL_INSIDE.search(text) and "{}" in text)):
                continue
            if "SQLite" in text or ("database" in text.lower() and "WHERE" not in text):
                continue  # an error message that mentions SQL words
            checked += 1
            for value in node.values:
                if isinstance(value, ast.FormattedValue):
                    source = ast.unparse(value.value)
                    if not _ALLOWED.match(source):
                        findings.append(f"{path.name}:{node.lineno}: {{{source}}} in {text!r}")
    assert checked > 10
    assert findings == []
