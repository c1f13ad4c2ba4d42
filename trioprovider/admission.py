"""Admission: may this request run now, in which session, against which budget?

The :class:`Gate` turns a principal into an :class:`Admission` (a session slot and a rate
reservation) or a 429. An admission is released exactly once, synchronously, whichever way the
request ends: by its RequestScope, or by the HTTP layer's backstop if the response never
started (a client that left between the view and the first byte).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from trioprovider.auth import Principal
from trioprovider.errors import ApiError
from trioprovider.ratelimit import RateLimiter, Refusal, Reservation, format_duration
from trioprovider.sessions import Session, SessionLimit, SessionRefused, SessionStore


@dataclass(eq=False)
class Admission:
    principal: Principal
    session: Session
    reservation: Reservation
    _sessions: SessionStore
    released: bool = field(default=False)
    #: Called once on release, after the session and reservation (e.g. a concurrency slot).
    on_release: Callable[[], None] | None = None

    def release(self, now: float) -> None:
        if self.released:
            return
        self.released = True
        self.reservation.settle(now)
        self._sessions.end_request(self.session, now)
        if self.on_release is not None:
            self.on_release()


class Gate:
    def __init__(self, sessions: SessionStore, limiter: RateLimiter) -> None:
        self.sessions = sessions
        self.limiter = limiter
        self.rate_limited = 0

    def admit(self, principal: Principal, session_id: str | None, tokens: int, now: float) -> Admission:
        """Admit one model request of ``tokens`` estimated tokens, or raise a 4xx ApiError."""
        client = principal.owner
        verdict = self.limiter.admit(client, tokens, now)
        if isinstance(verdict, Refusal):
            self.rate_limited += 1
            raise self._refusal(client, verdict, now)
        try:
            session = self.sessions.begin_request(principal.owner, session_id, now)
        except SessionRefused as error:
            verdict.settle(now, used=0)
            raise ApiError(400, str(error), code="invalid_session", param="X-Session-Id") from None
        except SessionLimit as error:
            verdict.settle(now, used=0)
            raise ApiError(429, str(error), code="session_limit", headers={"Retry-After": "5"}) from None
        return Admission(principal, session, verdict, self.sessions)

    def _refusal(self, client: str, refusal: Refusal, now: float) -> ApiError:
        headers = self.limiter.headers(client, now)
        retry = refusal.retry_after
        if retry == float("inf"):
            # More tokens than a whole minute's budget can ever hold at once.
            return ApiError(
                429,
                "This request needs more tokens than the per-minute limit allows.",
                code="rate_limit_exceeded",
                headers=headers,
            )
        headers["Retry-After"] = str(max(1, int(retry + 0.999)))
        return ApiError(
            429,
            f"Rate limit reached for {refusal.limit} per minute; retry in {format_duration(retry)}.",
            code="rate_limit_exceeded",
            headers=headers,
        )
