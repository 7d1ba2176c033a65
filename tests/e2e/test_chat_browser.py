"""The example chat in headless Chromium: two tabs on different workers chat with each other.

Needs Debian's ``chromium`` (``apt-get install chromium chromium-driver``) and the ``playwright``
package; Playwright drives /usr/bin/chromium, its own browsers are never downloaded. Skipped when
Chromium is missing, unless ``CI`` is set: then a missing browser is a failure.

Screenshots go to ``artifacts/e2e/`` at the repository root. With ``CHAT_UPDATE_SCREENSHOT=1``
the side-by-side picture also replaces ``docs/chat-screenshot.png`` (the README's).
"""

from __future__ import annotations

import base64
import html
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from conftest import ChatServer

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = REPO / "artifacts" / "e2e"
DOCS_SCREENSHOT = REPO / "docs" / "chat-screenshot.png"
DOCS_LIMIT = 200_000
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ATTEMPTS = 20
TIMEOUT_MS = 15_000
VIEWPORT = {"width": 820, "height": 560}


def _missing() -> str | None:
    if not CHROMIUM.exists():
        return f"{CHROMIUM} not found (apt-get install chromium chromium-driver)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (it drives /usr/bin/chromium)"
    return None


MISSING = _missing()
pytestmark = pytest.mark.skipif(
    MISSING is not None and not os.environ.get("CI"),
    reason=f"{MISSING}; set CI=1 to make this a failure",
)


@pytest.fixture(scope="module", autouse=True)
def _browser_available() -> None:
    """Under CI a missing browser fails the test (before any server is started)."""
    if MISSING is not None:
        pytest.fail(f"CI is set but the browser test cannot run: {MISSING}")


@pytest.fixture
def browser_context(tmp_path: Path) -> Any:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # Playwright passes the fresh profile as --user-data-dir.
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=str(CHROMIUM),
            args=CHROMIUM_FLAGS,
            headless=True,
            viewport=VIEWPORT,
            device_scale_factor=1,
            locale="en-GB",
            timezone_id="UTC",
        )
        context.set_default_timeout(TIMEOUT_MS)
        try:
            yield context
        finally:
            context.close()


def open_room(context: Any, server: ChatServer, room: str, name: str, not_pid: str = "") -> Any:
    """A tab in ``room`` whose WebSocket is on a worker other than ``not_pid``."""
    page = context.new_page()
    page.goto(f"{server.url}room/{room}/?name={name}")
    for _ in range(ATTEMPTS):
        page.wait_for_selector("#status.connected")
        if live_pid(page) != not_pid:
            return page
        page.reload()
    pytest.fail(f"{ATTEMPTS} page loads all connected to worker {not_pid}")


def live_pid(page: Any) -> str:
    return page.inner_text("#ws-pid").strip()


def send(page: Any, text: str) -> None:
    page.fill("#message-input", text)
    page.press("#message-input", "Enter")


def message(page: Any, text: str) -> Any:
    locator = page.locator("#messages .message", has_text=text)
    locator.wait_for()
    return locator


def test_two_tabs_on_two_workers_chat(browser_context: Any, chat_server: ChatServer) -> None:
    from playwright.sync_api import expect

    alice = open_room(browser_context, chat_server, "lobby", "alice")
    bob = open_room(browser_context, chat_server, "lobby", "bob", not_pid=live_pid(alice))
    alice_pid, bob_pid = live_pid(alice), live_pid(bob)
    assert alice_pid != bob_pid
    assert re.fullmatch(r"\d+", alice_pid) and re.fullmatch(r"\d+", bob_pid)
    for page in (alice, bob):
        assert page.inner_text("#page-pid").strip().isdigit()

    # Presence: each tab lists both people, with the worker each is connected to.
    for page in (alice, bob):
        expect(page.locator("#online-count")).to_have_text("2")
        expect(page.locator("#online li", has_text="alice")).to_contain_text(f"pid {alice_pid}")
        expect(page.locator("#online li", has_text="bob")).to_contain_text(f"pid {bob_pid}")

    send(alice, "Hi Bob! I am on another worker process.")
    got = message(bob, "Hi Bob! I am on another worker process.")
    expect(got.locator(".author")).to_have_text("alice")
    expect(got.locator(".route")).to_contain_text(
        f"sent from pid {alice_pid} · relayed by pid {bob_pid}"
    )
    expect(got.locator(".crossed")).to_be_visible()
    expect(message(alice, "Hi Bob!")).to_have_class(re.compile(r"\bmine\b"))

    send(bob, "Hello Alice, it came through channels-lite.")
    got = message(alice, "it came through channels-lite")
    expect(got.locator(".route")).to_contain_text(f"sent from pid {bob_pid}")
    expect(bob.locator("#message-input")).to_have_value("")

    done = chat_server.manage("post", "lobby", "Deploy finished (posted from sync code)")
    assert done.returncode == 0, done.stderr
    for page in (alice, bob):
        expect(message(page, "Deploy finished").locator(".route")).to_contain_text(
            "via manage.py post"
        )

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shots = {}
    for label, page in (("alice", alice), ("bob", bob)):
        shots[label] = ARTIFACTS / f"chat-{label}.png"
        page.screenshot(path=str(shots[label]))
    combined = ARTIFACTS / "chat-two-tabs.png"
    captions = {
        f"alice, WebSocket on worker pid {alice_pid}": shots["alice"],
        f"bob, WebSocket on worker pid {bob_pid}": shots["bob"],
    }
    side_by_side(browser_context, captions, combined)
    print(f"\nscreenshots: {', '.join(str(p) for p in [*shots.values(), combined])}")
    assert combined.stat().st_size < DOCS_LIMIT, "screenshot too large for docs/"
    if os.environ.get("CHAT_UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(combined, DOCS_SCREENSHOT)
        print(f"updated {DOCS_SCREENSHOT}")

    # A tab that reloads lands on a worker again and the room keeps working.
    bob.reload()
    bob.wait_for_selector("#status.connected")
    expect(alice.locator("#online-count")).to_have_text("2")
    send(bob, "back after a reload")
    message(alice, "back after a reload")


def side_by_side(context: Any, tabs: dict[str, Path], out: Path) -> None:
    """Both tabs in one picture, drawn by the browser itself (no imaging library needed)."""
    images = "".join(
        f"<figure><figcaption>Tab {n}: {html.escape(caption)}</figcaption>"
        f'<img src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}">'
        "</figure>"
        for n, (caption, path) in enumerate(tabs.items(), 1)
    )
    page = context.new_page()
    page.set_viewport_size({"width": 2 * VIEWPORT["width"] + 36, "height": VIEWPORT["height"] + 50})
    page.set_content(
        "<style>body{margin:0;padding:12px;background:#cfd4dc;display:flex;gap:12px;"
        "font:13px system-ui,sans-serif}figure{margin:0}figcaption{color:#1d2330;padding:0 0 6px}"
        "img{display:block;box-shadow:0 1px 4px rgba(0,0,0,.25)}</style>" + images
    )
    page.locator("body").screenshot(path=str(out))
    page.close()
