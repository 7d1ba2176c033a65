"""The bookkeeping behind messages handed on from notifications (no server needed)."""

from __future__ import annotations

import base64

import pytest

from channels_lite.drivers.base import Claimed, ClaimRequest
from channels_lite.drivers.postgres import inbound
from channels_lite.drivers.postgres.inbound import Delivered, Inbound, parse_note

NOW = 1_700_000_000.0


def note(
    row_id: int, channel: str, payload: bytes, expires_at: float = NOW + 60, capacity: int = 100
) -> str:
    # As schema.Tables.push_one_ddl builds it (PostgreSQL's base64 wraps lines at 76).
    encoded = base64.encodebytes(payload).decode().strip()
    return f"tok {row_id} {encoded} {expires_at!r} {capacity} {channel}"


def trusted(key: str = "k!") -> Inbound:
    box = Inbound(Delivered())
    ticket = box.ticket([key], lambda _: 1)
    row = (1, Claimed("x.k!c", key, b"first", NOW + 60))
    assert [m.payload for m in box.claimed(ticket, [ClaimRequest(key, 10)], [row], lambda _: 1)]
    assert box.trusts(key)
    return box


def test_parse_note_round_trips_any_payload_and_channel() -> None:
    payload = bytes(range(256)) * 30
    parsed = parse_note("k!", note(7, "a.k!odd name", payload, NOW + 0.1, capacity=3))
    assert parsed == (7, Claimed("a.k!odd name", "k!", payload, NOW + 0.1), 3)
    assert parse_note("k!", "tok") is None


def test_parse_note_refuses_garbage() -> None:
    assert parse_note("k!", "tok x !!! 1.0 100 ch") is None
    assert parse_note("k!", "tok 1 AAAA notafloat 100 ch") is None
    assert parse_note("k!", "tok 1 AAAA 1.0 nocapacity ch") is None


def test_trust_needs_a_drained_claim_with_the_listen_in_place() -> None:
    box = Inbound(Delivered())
    request = ClaimRequest("k!", 1)
    row = (1, Claimed("x.k!c", "k!", b"p", NOW + 60))
    # Full batch: more may be waiting in the table.
    box.claimed(box.ticket(["k!"], lambda _: 1), [request], [row], lambda _: 1)
    assert not box.trusts("k!")
    # No LISTEN when the claim was sent.
    box.claimed(box.ticket(["k!"], lambda _: None), [ClaimRequest("k!", 5)], [], lambda _: 1)
    assert not box.trusts("k!")
    # The listener reconnected while the claim was in flight.
    box.claimed(box.ticket(["k!"], lambda _: 1), [ClaimRequest("k!", 5)], [], lambda _: 2)
    assert not box.trusts("k!")
    # A chain break while the claim was in flight.
    ticket = box.ticket(["k!"], lambda _: 1)
    box.note("k!", "tok")
    box.claimed(ticket, [ClaimRequest("k!", 5)], [], lambda _: 1)
    assert not box.trusts("k!")
    # Exclusions leave messages behind.
    ticket = box.ticket(["k!"], lambda _: 1)
    excluding = ClaimRequest("k!", 5, exclude=frozenset({"x.k!c"}))
    box.claimed(ticket, [excluding], [], lambda _: 1)
    assert not box.trusts("k!")
    box.claimed(box.ticket(["k!"], lambda _: 1), [ClaimRequest("k!", 5)], [], lambda _: 1)
    assert box.trusts("k!")


def test_an_answered_ping_renews_trust_without_reviving_a_broken_chain(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [1000.0]
    monkeypatch.setattr(inbound.time, "monotonic", lambda: clock[0])
    box = trusted("k!")
    for key in ("j!", "m!"):
        ticket = box.ticket([key], lambda _: 1)
        box._process_keys.add(key)
        box.claimed(ticket, [ClaimRequest(key, 5)], [], lambda _: 1)
    box.break_chain("j!")
    clock[0] += 0.5
    box.alive(clock[0])
    clock[0] += inbound.TRUST_TTL - 0.01
    box.note("k!", note(2, "x.k!c", b"second"))
    assert [m.payload for m in box.serve(ClaimRequest("k!", 10), NOW) or []] == [b"second"]
    assert box.serve(ClaimRequest("j!", 10), NOW) is None  # broken: back to the table
    # An older ping never shortens trust; without a newer one it lapses on time.
    box.alive(clock[0] - inbound.TRUST_TTL)
    clock[0] += 0.02
    assert box.serve(ClaimRequest("k!", 10), NOW) is None
    assert box.serve(ClaimRequest("m!", 10), NOW) is None
    assert not box.trusting


def test_normal_channel_keys_are_never_trusted() -> None:
    box = Inbound(Delivered())
    ticket = box.ticket(["jobs"], lambda _: 1)
    row = (1, Claimed("jobs", "jobs", b"p", NOW + 60))
    box.claimed(ticket, [ClaimRequest("jobs", 5)], [row], lambda _: 1)
    assert not box.trusts("jobs")
    assert box.serve(ClaimRequest("jobs", 5), NOW) is None


def test_stale_notifications_are_dropped() -> None:
    box = trusted()
    box.note("k!", note(1, "x.k!c", b"first"))  # the claim above took row 1
    box.note("k!", note(2, "x.k!c", b"second"))
    assert [m.payload for m in box.serve(ClaimRequest("k!", 10), NOW) or []] == [b"second"]
    assert box.take_doomed() == [2]
    # Row 2 is still in the table (deletion pending): a claim meeting it drops it.
    row = (2, Claimed("x.k!c", "k!", b"second", NOW + 60))
    assert box.claimed({}, [ClaimRequest("k!", 10)], [row], lambda _: 1) == []
    box.note("k!", note(2, "x.k!c", b"second"))
    assert box.serve(ClaimRequest("k!", 10), NOW) == []


def test_a_claim_answered_after_the_background_delete_does_not_deliver_twice() -> None:
    """The claim locked a handed-on row before its background DELETE did, so the DELETE
    waited, found nothing, and its answer was read first (ending the row's *taken* state);
    the claim's answer then still carries the row. Seen once in a benchmark run (one message
    received twice out of 1,020)."""
    box = trusted()
    box.note("k!", note(2, "x.k!c", b"second"))
    assert [m.payload for m in box.serve(ClaimRequest("k!", 10), NOW) or []] == [b"second"]
    assert box.take_doomed() == [2]
    box.delivered.deleted([2])
    assert box.delivered.pending == 0
    rows = [(2, Claimed("x.k!c", "k!", b"second", NOW + 60))]
    rows.append((3, Claimed("x.k!c", "k!", b"third", NOW + 60)))
    got = box.claimed({}, [ClaimRequest("k!", 10)], rows, lambda _: 1)
    assert [m.payload for m in got] == [b"third"]
    # Row 3 came by the claim: its notification, read later, is stale.
    box.note("k!", note(3, "x.k!c", b"third"))
    assert box.serve(ClaimRequest("k!", 10), NOW) == []


def test_a_small_channel_asks_for_its_rows_deleted_before_handing_on() -> None:
    """Handed on from a notification, a message's row is deleted in the background, except on
    a channel whose capacity is below DELETE_FIRST_BELOW: there the driver deletes first, so
    that a reply cannot bring the next message back to a channel still counted full."""
    box = trusted()
    box.note("k!", note(2, "x.k!c", b"roomy"))
    assert [m.payload for m in box.serve(ClaimRequest("k!", 10), NOW) or []] == [b"roomy"]
    assert not box.delete_first
    box.note("k!", note(3, "x.k!c", b"small", capacity=inbound.DELETE_FIRST_BELOW - 1))
    assert [m.payload for m in box.serve(ClaimRequest("k!", 10), NOW) or []] == [b"small"]
    assert box.delete_first
    assert box.take_doomed() == [2, 3]


def test_serving_at_once_leaves_a_small_channel_and_what_follows_it_held() -> None:
    """claim_ready cannot wait for a deletion: it stops before a message of a channel below
    DELETE_FIRST_BELOW, and the next claim hands that one and the rest on, in order."""
    box = trusted()
    box.note("k!", note(2, "x.k!c", b"roomy"))
    box.note("k!", note(3, "x.k!c", b"small", capacity=inbound.DELETE_FIRST_BELOW - 1))
    box.note("k!", note(4, "x.k!c", b"after"))
    got = box.serve(ClaimRequest("k!", 10), NOW, at_once=True)
    assert [m.payload for m in got or []] == [b"roomy"]
    assert not box.delete_first
    assert box.serve(ClaimRequest("k!", 10), NOW, at_once=True) == []
    assert [m.payload for m in box.serve(ClaimRequest("k!", 10), NOW) or []] == [
        b"small",
        b"after",
    ]
    assert box.delete_first
    assert box.take_doomed() == [2, 3, 4]


def test_a_forgotten_record_breaks_the_chain_instead_of_guessing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(inbound, "MAX_REMEMBERED", 2)
    box = trusted()
    for i, channel in enumerate(["x.k!a", "x.k!b", "x.k!d"], start=10):
        box.delivered.claimed("k!", channel, i)
    # x.k!c's record (row 1) was forgotten, raising k!'s floor to 1: row 1 cannot be told
    # apart from a new message below the floor...
    assert box.delivered.seen("k!", "x.k!c", 1) is None
    box.note("k!", note(1, "x.k!c", b"first"))
    assert not box.trusts("k!")
    # ... while a row above the floor can.
    assert box.delivered.seen("k!", "x.k!c", 12) is False


def test_too_many_held_messages_break_the_chain(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inbound, "MAX_HELD", 3)
    box = trusted()
    for i in range(2, 6):
        box.note("k!", note(i, "x.k!c", b"m"))
    assert not box.trusts("k!")
    assert box.serve(ClaimRequest("k!", 10), NOW) is None


def test_own_push_spoils_a_claim_in_flight() -> None:
    """The instance's own push is never announced to it: a claim sent before that push
    commits may not have seen it, so it must not establish trust."""
    box = Inbound(Delivered())
    box.note("k!", "tok")  # known as a process key
    ticket = box.ticket(["k!"], lambda _: 1)
    box.own_push("k!")
    box.claimed(ticket, [ClaimRequest("k!", 5)], [], lambda _: 1)
    assert not box.trusts("k!")
    box.own_push("other!")  # a key this instance never claims: nothing to remember
    assert "other!" not in box._breaks


def test_trust_lapses_and_what_is_held_survives_the_next_claim(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    box = trusted()
    box.note("k!", note(2, "x.k!c", b"two"))
    box.note("k!", note(3, "x.k!c", b"three"))
    monkeypatch.setattr(inbound.time, "monotonic", lambda: 1e12)
    assert box.serve(ClaimRequest("k!", 10), NOW) is None
    # The claim that follows found row 2 only (row 3 committed after its snapshot).
    ticket = box.ticket(["k!"], lambda _: 1)
    row = (2, Claimed("x.k!c", "k!", b"two", NOW + 60))
    got = box.claimed(ticket, [ClaimRequest("k!", 10)], [row], lambda _: 1)
    assert [m.payload for m in got] == [b"two"]
    assert [m.payload for m in box.serve(ClaimRequest("k!", 10), NOW) or []] == [b"three"]


def test_take_is_check_and_record_in_one_step() -> None:
    delivered = Delivered()
    assert delivered.take("k!", "x.k!c", 5) is True
    assert delivered.take("k!", "x.k!c", 5) is False  # another instance heard it too
    assert delivered.take("k!", "x.k!c", 4) is False  # older than what was handed on
    assert delivered.pending == 1
    assert delivered.claimed("k!", "x.k!c", 5) is False  # a claim that meets the row drops it
    assert delivered.pending == 0
    assert delivered.claimed("k!", "x.k!c", 6) is True
