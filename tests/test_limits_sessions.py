"""Token buckets, reservations and sessions: pure arithmetic with the time passed in."""

from __future__ import annotations

import pytest

from trioprovider.admission import Gate
from trioprovider.auth import KeyRing, Principal
from trioprovider.config import hash_key
from trioprovider.errors import ApiError
from trioprovider.ratelimit import RateLimiter, Refusal, Reservation, TokenBucket, format_duration
from trioprovider.sessions import SessionLimit, SessionRefused, SessionStore


def test_bucket_refills_continuously_up_to_capacity() -> None:
    bucket = TokenBucket(capacity=10, rate=1, now=0)
    assert bucket.take(10, now=0) == 0
    assert bucket.take(1, now=0) == pytest.approx(1)
    assert bucket.take(3, now=2) == pytest.approx(1)  # 2 refilled, 3 wanted
    assert bucket.take(2, now=2) == 0
    assert bucket.wait_time(5, now=1000) == 0 and bucket.level == 10
    assert bucket.wait_time(11, now=1000) == float("inf")


def test_requests_per_minute_with_burst() -> None:
    limiter = RateLimiter(requests_per_minute=60, tokens_per_minute=1_000_000, burst=10)
    for _ in range(70):
        reservation = limiter.admit("c", 1, now=0)
        assert isinstance(reservation, Reservation)
        reservation.settle(now=0)
    refused = limiter.admit("c", 1, now=0)
    assert isinstance(refused, Refusal) and refused.limit == "requests"
    assert refused.retry_after == pytest.approx(1.0)
    assert isinstance(limiter.admit("c", 1, now=1.0), Reservation)
    # Another client has its own budget.
    assert isinstance(limiter.admit("d", 1, now=0), Reservation)


def test_reservation_refunds_the_unused_rest_and_charges_excess() -> None:
    limiter = RateLimiter(requests_per_minute=1000, tokens_per_minute=600, burst=0)
    reservation = limiter.admit("c", 500, now=0)
    assert isinstance(reservation, Reservation) and limiter.open_reservations == 1
    assert isinstance(limiter.admit("c", 200, now=0), Refusal)
    reservation.charge(50)
    reservation.settle(now=0)
    reservation.settle(now=0)  # idempotent
    assert limiter.open_reservations == 0
    assert isinstance(limiter.admit("c", 500, now=0), Reservation)  # 450 came back
    over = limiter.admit("d", 100, now=0)
    assert isinstance(over, Reservation)
    over.settle(now=0, used=700)  # the agent ignored max_tokens: the excess is debt
    refused = limiter.admit("d", 1, now=0)
    assert isinstance(refused, Refusal) and refused.limit == "tokens"


def test_rate_limit_headers_and_durations() -> None:
    limiter = RateLimiter(requests_per_minute=60, tokens_per_minute=6000, burst=0)
    limiter.admit("c", 100, now=0)
    headers = limiter.headers("c", now=0)
    assert headers["x-ratelimit-limit-requests"] == "60"
    assert headers["x-ratelimit-remaining-requests"] == "59"
    assert headers["x-ratelimit-reset-requests"] == "1s"
    assert headers["x-ratelimit-remaining-tokens"] == "5900"
    assert format_duration(0.012) == "12ms" and format_duration(90) == "1m30s"


def test_disabled_limiter_admits_everything_and_still_counts_reservations() -> None:
    limiter = RateLimiter(requests_per_minute=1, tokens_per_minute=1, burst=0, enabled=False)
    reservations = [limiter.admit("c", 10**6, now=0) for _ in range(5)]
    assert all(isinstance(r, Reservation) for r in reservations)
    for r in reservations:
        r.settle(now=0)  # type: ignore[union-attr]
    assert limiter.open_reservations == 0 and limiter.headers("c", 0) == {}


def test_sessions_per_owner_pinned_ttl_idle_and_revoke() -> None:
    store = SessionStore(ttl=300, max_idle=60, max_sessions=2)
    a = store.begin_request("alice", None, now=0)
    assert store.begin_request("alice", None, now=1) is a and a.active_requests == 2
    store.end_request(a, now=2)
    store.end_request(a, now=2)
    pinned = store.begin_request("bob", "chat-1", now=3)
    assert pinned.id == "chat-1"
    with pytest.raises(SessionLimit):
        store.begin_request("carol", None, now=4)
    with pytest.raises(SessionRefused):
        store.begin_request("alice", "chat-1", now=4)  # bob's session
    with pytest.raises(SessionRefused):
        store.begin_request("alice", "bad id!", now=4)
    # Alice idle for 60 s with nothing running: ended. Bob's running request keeps his alive...
    assert store.purge(now=62) == 1 and a.ended.is_set() and a.end_reason == "session_idle"
    # ...until its TTL.
    assert store.purge(now=303) == 1 and pinned.end_reason == "session_expired"
    b = store.begin_request("alice", None, now=400)
    assert b is not a and store.revoke(b.id) and b.end_reason == "session_revoked"
    assert len(store) == 0 and store.total_created == 3 and store.total_expired == 2


def test_gate_turns_limits_into_429s_and_takes_nothing_on_refusal() -> None:
    g = Gate(SessionStore(ttl=300, max_idle=300, max_sessions=1), RateLimiter(requests_per_minute=1, tokens_per_minute=100, burst=0))
    who = Principal("key", "127.0.0.1")
    admission = g.admit(who, None, 10, now=0)
    with pytest.raises(ApiError) as raised:
        g.admit(who, None, 10, now=0)
    assert raised.value.status == 429 and raised.value.headers["Retry-After"] == "60"
    assert "x-ratelimit-remaining-requests" in raised.value.headers
    admission.release(now=0)
    admission.release(now=0)
    assert g.sessions.active_requests == 0 and g.limiter.open_reservations == 0
    other = Principal("key", "10.0.0.2")
    with pytest.raises(ApiError) as full:
        g.admit(other, None, 10, now=0)  # one session allowed, owned by the first client
    assert full.value.status == 429 and full.value.code == "session_limit"
    assert g.limiter.open_reservations == 0


def test_keyring_checks_bearer_keys_by_hash() -> None:
    ring = KeyRing([("main", hash_key("s3cret")), ("ci", hash_key("other"))])
    assert ring.check("Bearer s3cret") == "main"
    assert ring.check("bearer other") == "ci"
    for header in (None, "", "Bearer", "Bearer wrong", "Basic czNjcmV0", "s3cret"):
        assert ring.check(header) is None


def test_one_client_cannot_take_every_session_slot() -> None:
    store = SessionStore(ttl=300, max_idle=300, max_sessions=6, max_per_owner=2)
    first = store.begin_request("mallory", "m-1", now=0)
    second = store.begin_request("mallory", "m-2", now=1)
    store.end_request(first, now=2)
    # Past its own limit, the client's oldest idle session makes way; nobody else's.
    third = store.begin_request("mallory", "m-3", now=3)
    assert first.end_reason == "session_replaced" and store.get("m-1") is None
    assert {s.id for s in store} == {"m-2", "m-3"}
    # With both of its sessions busy, the client is refused; others still get sessions.
    with pytest.raises(SessionLimit, match="max_sessions_per_client"):
        store.begin_request("mallory", "m-4", now=4)
    assert store.begin_request("alice", None, now=5).owner == "alice"
    assert second.end_reason is None and third.end_reason is None


def test_a_full_store_lets_a_client_replace_its_own_idle_session_only() -> None:
    store = SessionStore(ttl=300, max_idle=300, max_sessions=2, max_per_owner=2)
    alice = store.begin_request("alice", None, now=0)
    store.end_request(alice, now=1)
    bob = store.begin_request("bob", None, now=2)
    # Full: bob (one session, running) can not push alice's idle session out.
    with pytest.raises(SessionLimit, match="security.max_sessions"):
        store.begin_request("bob", "bob-2", now=3)
    assert alice.end_reason is None and bob.end_reason is None
