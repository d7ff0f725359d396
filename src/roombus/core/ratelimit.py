"""
Per-connection rate limiting: a token bucket, and a tally of refusals for abuse.

Theory of operation
-------------------
Each connection may send ``rate`` messages per second on average and ``burst`` at
once: a bucket holds up to ``burst`` tokens, refills at ``rate`` per second, and every
message takes one, plus one per 4 KiB of its text (a 64 KiB message takes 17),
since what a message costs the server grows with its size. A message that finds
the bucket empty is refused (the broker answers ``rate_limited`` and drops it).

Refusals are tallied in a second counter, *strikes*, that drains at the same
``rate``. A client that keeps sending more than twice its allowance makes strikes
grow without bound; once they pass ``burst`` the client is abusive and the broker
closes it with 1008. A client that merely bursts past its allowance now and then
only sees ``rate_limited`` errors. Time comes in as ``now``; the limiter never
reads a clock.
"""

from __future__ import annotations

import enum

import attrs


class RateDecision(enum.Enum):
    """What to do with one message."""

    ALLOW = "allow"
    REFUSE = "refuse"  #: answer ``rate_limited`` and drop it
    ABUSE = "abuse"  #: close the connection with 1008


@attrs.define
class RateLimiter:
    """
    One connection's token bucket.

    Args:
        rate: Messages per second allowed on average (> 0).
        burst: Messages allowed at once; also the strikes that make a client abusive.
        now: The instant the connection opened (the bucket starts full).
    """

    rate: float
    burst: int
    updated_at: float
    tokens: float = attrs.field(
        default=attrs.Factory(lambda self: float(self.burst), takes_self=True)
    )
    strikes: float = 0.0

    def take(self, now: float, cost: float = 1.0) -> RateDecision:
        """Account for a message arriving at *now* that costs *cost* tokens."""
        elapsed = now - self.updated_at
        if elapsed > 0:
            self.updated_at = now
            refill = elapsed * self.rate
            self.tokens = min(float(self.burst), self.tokens + refill)
            self.strikes = max(0.0, self.strikes - refill)
        if self.tokens > cost - 1e-9:  # tolerate rounding in the refill
            self.tokens -= cost
            return RateDecision.ALLOW
        self.strikes += 1.0
        return RateDecision.ABUSE if self.strikes > self.burst else RateDecision.REFUSE
