"""JWTAuthenticator at its edges: a secret's length in bytes, the time claims against
the *now* given (never the clock), the token length and nesting limits."""

from __future__ import annotations

import json

import pytest

from roombus.core.auth import Identity
from roombus.core.errors import ConfigError
from roombus.server.auth import MAX_CLAIMS_DEPTH, MAX_TOKEN_LENGTH, JWTAuthenticator, Refusal

from ..core.test_auth import SECRET, claims, forged, hs256_token, run

#: Far from the wall clock either way: a check made against the clock would differ.
FUTURE = 4_000_000_000.0  # 2096
PAST = 1_000.0


def test_a_text_secret_is_measured_in_utf8_bytes() -> None:
    JWTAuthenticator(secret="é" * 16)  # 16 characters, 32 bytes: enough
    with pytest.raises(ConfigError, match="at least 32 bytes, not 31"):
        JWTAuthenticator(secret="é" * 15 + "x")


@pytest.mark.parametrize("now", [FUTURE, PAST])
def test_the_time_claims_are_checked_against_now_not_the_clock(now: float) -> None:
    hs256 = JWTAuthenticator(secret=SECRET)
    good = hs256_token(claims(nbf=now - 10, exp=now + 10))
    assert isinstance(run(hs256, good, now=now), Identity)
    early = hs256_token(claims(nbf=now + 100, exp=now + 200))
    assert run(hs256, early, now=now) == Refusal(401, "token not yet valid")
    late = hs256_token(claims(nbf=now - 200, exp=now - 100))
    assert run(hs256, late, now=now) == Refusal(401, "token expired")


def _token_of_length(length: int) -> str:
    """A good token exactly *length* characters long (padded by a claim)."""
    for pad in range(length):
        for sub in ("ann", "anne", "annie"):
            token = hs256_token(claims(sub=sub, pad="x" * pad))
            if len(token) == length:
                return token
            if len(token) > length + 8:
                break
    raise AssertionError(length)


def test_a_token_of_the_longest_length_is_taken() -> None:
    hs256 = JWTAuthenticator(secret=SECRET)
    assert isinstance(run(hs256, _token_of_length(MAX_TOKEN_LENGTH)), Identity)
    longer = _token_of_length(MAX_TOKEN_LENGTH + 1)
    assert run(hs256, longer) == Refusal(401, "token too long")


def _nested(depth: int) -> object:
    value: object = 0
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("header", [{"alg": "HS256", "typ": "JWT"}, {"alg": "HS256"}])
@pytest.mark.parametrize("depth", [MAX_CLAIMS_DEPTH - 1, MAX_CLAIMS_DEPTH, 40, 100])
def test_claims_nested_past_the_limit_are_refused(depth: int, header: dict[str, str]) -> None:
    # The claims object is one level; the claim inside it the rest. Headers of any
    # length: the segments are measured apart.
    hs256 = JWTAuthenticator(secret=SECRET)
    payload = json.dumps(claims(extra=_nested(depth - 1))).encode()
    verdict = run(hs256, forged(header, payload, SECRET.encode()))
    if depth <= MAX_CLAIMS_DEPTH:
        assert isinstance(verdict, Identity)
    else:
        assert verdict == Refusal(401, "invalid token")


@pytest.mark.parametrize(
    ("settings", "setting"),
    [
        ({"secret": 12345}, "jwt-secret"),
        ({"secret": SECRET, "public_key": b"key"}, "jwt-secret"),
        ({}, "jwt-secret"),
        ({"public_key": b"not a PEM key"}, "jwt-public-key"),
    ],
)
def test_a_bad_key_names_its_setting(settings: dict[str, object], setting: str) -> None:
    with pytest.raises(ConfigError) as raised:
        JWTAuthenticator(**settings)  # type: ignore[arg-type]
    assert raised.value.setting == setting
