"""Token buckets, and per-client request and token budgets with reservations.

Pure arithmetic with the time passed in. A request is admitted by taking one request from the
client's request bucket and *reserving* its estimated tokens (prompt plus ``max_tokens``) from
its token bucket; while the answer streams the reservation is charged, and when it ends —
success, error or disconnect alike — the unused rest is refunded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


class TokenBucket:
    """``capacity`` units, refilled continuously at ``rate`` units per second."""

    def __init__(self, capacity: float, rate: float, now: float) -> None:
        self.capacity = capacity
        self.rate = rate
        self.level = capacity
        self._stamp = now

    def _refill(self, now: float) -> None:
        if now > self._stamp:
            self.level = min(self.capacity, self.level + (now - self._stamp) * self.rate)
            self._stamp = now

    def wait_time(self, amount: float, now: float) -> float:
        """Seconds until ``amount`` units are available (0 if they are now)."""
        self._refill(now)
        if self.level >= amount:
            return 0.0
        if amount > self.capacity:
            return math.inf
        return (amount - self.level) / self.rate

    def take(self, amount: float, now: float) -> float:
        """Take ``amount`` if available and return 0; else take nothing and return the wait."""
        wait = self.wait_time(amount, now)
        if wait == 0.0:
            self.level -= amount
        return wait

    def force_take(self, amount: float, now: float) -> None:
        """Take even past empty (debt repaid by refill): for usage beyond a reservation."""
        self._refill(now)
        self.level -= amount

    def give(self, amount: float, now: float) -> None:
        self._refill(now)
        self.level = min(self.capacity, self.level + amount)

    def reset_after(self, now: float) -> float:
        """Seconds until the bucket is full again."""
        self._refill(now)
        return max(0.0, (self.capacity - self.level) / self.rate)


@dataclass
class Refusal:
    """Over a limit: which one, and how long until a retry can succeed."""

    limit: str  # "requests" or "tokens"
    retry_after: float


class Reservation:
    """Tokens set aside for one request; charged as it streams, settled once at its end."""

    def __init__(self, limiter: RateLimiter | None, client: str, reserved: int) -> None:
        self._limiter = limiter
        self.client = client
        self.reserved = reserved
        self.used = 0
        self.settled = False

    def charge(self, tokens: int) -> None:
        self.used += tokens

    def settle(self, now: float, used: int | None = None) -> None:
        """Refund the unused rest (or take the excess). Idempotent."""
        if self.settled:
            return
        self.settled = True
        if used is not None:
            self.used = used
        if self._limiter is not None:
            self._limiter._settle(self, now)


class _Budget:
    def __init__(self, requests: TokenBucket, tokens: TokenBucket) -> None:
        self.requests = requests
        self.tokens = tokens


class RateLimiter:
    """Per-client budgets: requests per minute (plus a burst) and tokens per minute."""

    def __init__(
        self, *, requests_per_minute: int, tokens_per_minute: int, burst: int, enabled: bool = True
    ) -> None:
        self.enabled = enabled
        self.requests_per_minute = requests_per_minute
        self.tokens_per_minute = tokens_per_minute
        self.burst = burst
        self._budgets: dict[str, _Budget] = {}
        self.open_reservations = 0

    def _budget(self, client: str, now: float) -> _Budget:
        budget = self._budgets.get(client)
        if budget is None:
            budget = _Budget(
                TokenBucket(self.requests_per_minute + self.burst, self.requests_per_minute / 60, now),
                TokenBucket(self.tokens_per_minute, self.tokens_per_minute / 60, now),
            )
            self._budgets[client] = budget
        return budget

    def admit(self, client: str, tokens: int, now: float) -> Reservation | Refusal:
        if not self.enabled:
            self.open_reservations += 1
            return Reservation(self, client, 0)
        budget = self._budget(client, now)
        # Ask a request no more than the whole token budget: a huge max_tokens must not be
        # refused forever; its excess is charged as it is really used.
        tokens = min(tokens, self.tokens_per_minute)
        wait_requests = budget.requests.wait_time(1, now)
        wait_tokens = budget.tokens.wait_time(tokens, now)
        if wait_requests or wait_tokens:
            if wait_requests >= wait_tokens:
                return Refusal("requests", wait_requests)
            return Refusal("tokens", wait_tokens)
        budget.requests.take(1, now)
        budget.tokens.take(tokens, now)
        self.open_reservations += 1
        return Reservation(self, client, tokens)

    def _settle(self, reservation: Reservation, now: float) -> None:
        self.open_reservations -= 1
        if not self.enabled:
            return
        budget = self._budget(reservation.client, now)
        unused = reservation.reserved - reservation.used
        if unused > 0:
            budget.tokens.give(unused, now)
        elif unused < 0:
            budget.tokens.force_take(-unused, now)

    def headers(self, client: str, now: float) -> dict[str, str]:
        """The ``x-ratelimit-*`` headers for ``client`` as its budget stands now."""
        if not self.enabled:
            return {}
        budget = self._budget(client, now)
        return {
            "x-ratelimit-limit-requests": str(self.requests_per_minute),
            "x-ratelimit-remaining-requests": str(max(0, math.floor(budget.requests.level))),
            "x-ratelimit-reset-requests": format_duration(budget.requests.reset_after(now)),
            "x-ratelimit-limit-tokens": str(self.tokens_per_minute),
            "x-ratelimit-remaining-tokens": str(max(0, math.floor(budget.tokens.level))),
            "x-ratelimit-reset-tokens": format_duration(budget.tokens.reset_after(now)),
        }

    def forget_full(self, now: float) -> None:
        """Drop budgets that are full again: a fresh one is identical, and memory stays bounded."""
        for client, budget in list(self._budgets.items()):
            if budget.requests.reset_after(now) == 0 and budget.tokens.reset_after(now) == 0:
                del self._budgets[client]


def format_duration(seconds: float) -> str:
    """OpenAI's reset format: ``12ms``, ``1s``, ``1m30s``."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    whole = math.ceil(seconds)
    minutes, rest = divmod(whole, 60)
    return f"{minutes}m{rest}s" if minutes else f"{rest}s"
