"""The rate limiter: an allowance over any window, and abuse only when sustained."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from roombus import BrokerConfig, ConfigError
from roombus.core.ratelimit import RateDecision, RateLimiter
from roombus.lowlevel import Close

from ..helpers import cid, connect, inbox, make_broker, send


@given(
    rate=st.floats(min_value=0.5, max_value=100),
    burst=st.integers(1, 20),
    gaps=st.lists(st.floats(min_value=0, max_value=2), max_size=200),
)
def test_never_more_than_burst_plus_rate_times_window(
    rate: float, burst: int, gaps: list[float]
) -> None:
    limiter = RateLimiter(rate, burst, 0.0)
    now = 0.0
    allowed: list[float] = []
    for gap in gaps:
        now += gap
        if limiter.take(now) is RateDecision.ALLOW:
            allowed.append(now)
    # Over every window [allowed[i], allowed[j]], at most burst + rate * width messages.
    for i in range(len(allowed)):
        for j in range(i, len(allowed)):
            assert j - i + 1 <= burst + rate * (allowed[j] - allowed[i]) + 1e-6


@given(rate=st.floats(min_value=1, max_value=50), burst=st.integers(1, 20))
def test_steady_sender_within_the_rate_is_never_refused(rate: float, burst: int) -> None:
    limiter = RateLimiter(rate, burst, 0.0)
    for i in range(300):
        assert limiter.take(i / rate) is RateDecision.ALLOW


@given(rate=st.floats(min_value=1, max_value=50), burst=st.integers(1, 20))
def test_sending_at_three_times_the_rate_is_abuse_eventually(rate: float, burst: int) -> None:
    limiter = RateLimiter(rate, burst, 0.0)
    decisions = [limiter.take(i / (3 * rate)) for i in range(int(30 * burst + 30))]
    assert RateDecision.REFUSE in decisions
    assert decisions[-1] is RateDecision.ABUSE or RateDecision.ABUSE in decisions


def test_sending_at_one_and_a_half_times_the_rate_is_refused_but_not_abuse() -> None:
    limiter = RateLimiter(10, 5, 0.0)
    decisions = [limiter.take(i / 15) for i in range(3000)]
    assert RateDecision.REFUSE in decisions
    assert RateDecision.ABUSE not in decisions


def test_broker_refuses_then_closes_a_flooder_and_others_see_it_leave() -> None:
    b = make_broker(rate_limit=1, rate_burst=2)
    connect(b, 1, "flood")
    connect(b, 2, "calm")
    assert inbox(send(b, 1, {"type": "chat", "content": 1}), 2)[0]["type"] == "chat"
    send(b, 1, {"type": "chat", "content": 2})
    refused = send(b, 1, {"type": "chat", "content": 3})
    assert inbox(refused, 1) == [
        {"type": "error", "code": "rate_limited", "content": "too many messages"}
    ]
    assert inbox(refused, 2) == []
    send(b, 1, {"type": "chat", "content": 4})
    closing = send(b, 1, {"type": "chat", "content": 5})
    assert closing[0] == Close(conn=cid(1), code=1008, reason="rate limit exceeded")
    assert inbox(closing, 2)[0]["event"] == "leave"
    assert cid(1) not in b
    # The calm one has its own allowance.
    assert inbox(send(b, 2, {"type": "ping"}), 2) == [{"type": "pong"}]
    assert b.seq("lobby") == 2


def test_rate_limit_zero_turns_it_off() -> None:
    b = make_broker(rate_limit=0)
    connect(b, 1, "ann")
    for i in range(5000):
        assert inbox(send(b, 1, {"type": "ping"}), 1) == [{"type": "pong"}], i


def test_config_validation_names_the_setting() -> None:
    for kwargs, setting in [
        ({"rate_limit": -1}, "rate-limit"),
        ({"rate_limit": float("nan")}, "rate-limit"),
        ({"rate_burst": 0}, "rate-burst"),
        ({"ping_interval": 0}, "ping-interval"),
        ({"max_message_bytes": 10**7}, "send-queue-bytes"),
    ]:
        with pytest.raises(ConfigError) as info:
            BrokerConfig(**kwargs)
        assert info.value.setting == setting
        assert str(info.value).startswith(setting)
