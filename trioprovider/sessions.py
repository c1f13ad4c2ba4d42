"""Ephemeral, memory-only sessions: which client a request belongs to, for how long.

Pure bookkeeping with the time passed in (``now``: ``trio.current_time()`` in the server, a
MockClock's in tests). A session ends by expiry (``ttl`` after creation), idleness (no request
for ``max_idle`` seconds and none running) or revocation; when it ends its ``ended`` event is
set and its watchers are called: each live request watches its session that way, to stop when
it ends, with a callback rather than a task of its own.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
import secrets
from dataclasses import dataclass, field

import trio

_SESSION_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class SessionLimit(Exception):
    """``max_sessions`` live sessions exist already."""


class SessionRefused(Exception):
    """The session id is malformed or belongs to another client."""


@dataclass(eq=False)
class Session:
    id: str
    owner: str
    created_at: float
    expires_at: float
    last_used: float
    active_requests: int = 0
    ended: trio.Event = field(default_factory=trio.Event)
    end_reason: str | None = None
    #: Called with the end reason when the session ends (the live requests' stop switches).
    watchers: set[Callable[[str], None]] = field(default_factory=set)

    def end(self, reason: str) -> None:
        if self.end_reason is None:
            self.end_reason = reason
            self.ended.set()
            watchers, self.watchers = self.watchers, set()
            for watcher in watchers:
                watcher(reason)

    def watch(self, watcher: Callable[[str], None]) -> None:
        """Call ``watcher(reason)`` when the session ends (at once if it has ended already)."""
        if self.end_reason is not None:
            watcher(self.end_reason)
        else:
            self.watchers.add(watcher)

    def unwatch(self, watcher: Callable[[str], None]) -> None:
        self.watchers.discard(watcher)


class SessionStore:
    def __init__(self, *, ttl: float, max_idle: float, max_sessions: int, max_per_owner: int | None = None) -> None:
        self.ttl = ttl
        self.max_idle = max_idle
        self.max_sessions = max_sessions
        #: Sessions one client may hold: without it, one client's made-up session ids could take
        #: every slot and lock everybody else out.
        self.max_per_owner = max_sessions if max_per_owner is None else max_per_owner
        self._sessions: dict[str, Session] = {}
        self._by_owner: dict[str, str] = {}
        self.total_created = 0
        self.total_expired = 0

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._sessions.values()))

    def get(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    @property
    def active_requests(self) -> int:
        return sum(s.active_requests for s in self._sessions.values())

    def begin_request(self, owner: str, session_id: str | None, now: float) -> Session:
        """The session a new request of ``owner`` runs in (pinned by id, else the owner's own)."""
        if session_id is not None and not _SESSION_ID.match(session_id):
            raise SessionRefused("X-Session-Id must be 1-128 characters of A-Z a-z 0-9 . _ : -")
        self.purge(now)
        key = session_id if session_id is not None else self._by_owner.get(owner)
        session = self._sessions.get(key) if key is not None else None
        if session is not None and session.owner != owner:
            raise SessionRefused("that session belongs to another client")
        if session is None:
            self._make_room(owner)
            session = Session(
                id=session_id or f"sess_{secrets.token_urlsafe(12)}",
                owner=owner,
                created_at=now,
                expires_at=now + self.ttl,
                last_used=now,
            )
            self._sessions[session.id] = session
            if session_id is None:
                self._by_owner[owner] = session.id
            self.total_created += 1
        session.active_requests += 1
        session.last_used = now
        return session

    def _make_room(self, owner: str) -> None:
        """Room for a new session of ``owner``: past a limit, its own oldest idle session makes
        way (never a session with a request running, never another client's); else SessionLimit."""
        own = [session for session in self._sessions.values() if session.owner == owner]
        if len(own) < self.max_per_owner and len(self._sessions) < self.max_sessions:
            return
        idle = [session for session in own if session.active_requests == 0]
        if idle:
            oldest = min(idle, key=lambda session: session.last_used)
            self._forget(oldest)
            oldest.end("session_replaced")
            return
        if len(own) >= self.max_per_owner:
            raise SessionLimit(
                f"this client has {len(own)} sessions with requests running "
                "(security.max_sessions_per_client); retry when one finishes"
            )
        raise SessionLimit(
            f"{self.max_sessions} sessions are live (security.max_sessions); "
            "retry when one expires or revoke one"
        )

    def end_request(self, session: Session, now: float) -> None:
        session.active_requests -= 1
        session.last_used = now

    def revoke(self, session_id: str, reason: str = "session_revoked") -> bool:
        session = self._sessions.get(session_id)
        if session is None:
            return False
        self._forget(session)
        session.end(reason)
        return True

    def revoke_all(self, reason: str = "session_revoked") -> int:
        sessions = list(self._sessions.values())
        for session in sessions:
            self.revoke(session.id, reason)
        return len(sessions)

    def purge(self, now: float) -> int:
        """End sessions past their TTL, or idle with no request running; how many ended."""
        ended = 0
        for session in list(self._sessions.values()):
            if now >= session.expires_at:
                reason = "session_expired"
            elif session.active_requests == 0 and now - session.last_used >= self.max_idle:
                reason = "session_idle"
            else:
                continue
            self._forget(session)
            session.end(reason)
            self.total_expired += 1
            ended += 1
        return ended

    def _forget(self, session: Session) -> None:
        del self._sessions[session.id]
        if self._by_owner.get(session.owner) == session.id:
            del self._by_owner[session.owner]
