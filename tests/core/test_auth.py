"""Authentication (JWT, token sources, subprotocols) and room rules, with real tokens."""

from __future__ import annotations

import base64
import fnmatch
import functools
import hashlib
import hmac
import json
import sys
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import event, given
from hypothesis import strategies as st

from roombus.core.auth import (
    MAX_ROOM_PATTERN_LENGTH,
    MAX_ROOM_PATTERNS,
    Authorizer,
    ClaimsAuthorizer,
    Identity,
    RoomRules,
)
from roombus.core.errors import ConfigError
from roombus.core.names import RoomName, Username, is_valid_username
from roombus.server.auth import (
    MAX_TOKEN_LENGTH,
    SUBPROTOCOL,
    Authenticator,
    JWTAuthenticator,
    Refusal,
    selected_subprotocol,
    token_from_request,
)

from ..strategies import json_values

SECRET = "roombus-test-secret-0123456789abcdef"  # 36 bytes: long enough for HS256
OTHER_SECRET = "another-secret-that-is-also-long-enough"
NOW = 1_700_000_000.0
EXP = int(NOW) + 3600


# --- keys and tokens -------------------------------------------------------------------


@pytest.fixture(scope="module")
def rsa_private() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def rsa_public_pem(rsa_private: rsa.RSAPrivateKey) -> bytes:
    return _public_pem(rsa_private)


@pytest.fixture(scope="module")
def rs256(rsa_public_pem: bytes) -> JWTAuthenticator:
    return JWTAuthenticator(public_key=rsa_public_pem)


@pytest.fixture(scope="module")
def hs256() -> JWTAuthenticator:
    return JWTAuthenticator(secret=SECRET)


def _public_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256_token(claims: dict[str, Any], secret: str = SECRET) -> str:
    # By hand rather than jwt.encode, which refuses some of the odd claims tested here.
    return forged({"alg": "HS256", "typ": "JWT"}, json.dumps(claims).encode(), secret.encode())


def forged(header: dict[str, Any], payload: bytes, key: bytes | None) -> str:
    """A compact JWS built by hand: PyJWT refuses to make the hostile ones."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(payload)}"
    signature = (
        b"" if key is None else hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    )
    return f"{signing_input}.{_b64(signature)}"


def claims(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"sub": "ann", "exp": EXP}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not ...}


def bearer(token: str) -> list[tuple[bytes, bytes]]:
    return [(b"authorization", b"Bearer " + token.encode())]


def run(
    authenticator: Authenticator,
    token: str | None = None,
    *,
    headers: list[tuple[bytes, bytes]] | None = None,
    query: bytes = b"",
    now: float = NOW,
) -> Identity | Refusal:
    if headers is None:
        headers = bearer(token) if token is not None else []
    return authenticator.authenticate(path=b"/ws", query=query, headers=headers, now=now)


# --- accepted tokens -------------------------------------------------------------------


def test_valid_hs256_token(hs256: JWTAuthenticator) -> None:
    identity = run(hs256, jwt.encode(claims(), SECRET, algorithm="HS256"))
    assert identity == run(hs256, hs256_token(claims()))
    assert identity == Identity(username=Username("ann"), expires_at=float(EXP), claims=claims())
    assert identity.rooms is None
    assert hs256.algorithm == "HS256"


def test_valid_rs256_token(rs256: JWTAuthenticator, rsa_private: rsa.RSAPrivateKey) -> None:
    token = jwt.encode(claims(sub="bob"), rsa_private, algorithm="RS256")
    identity = run(rs256, token)
    assert isinstance(identity, Identity)
    assert identity.username == "bob"
    assert rs256.algorithm == "RS256"


def test_valid_es256_token() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    authenticator = JWTAuthenticator(public_key=_public_pem(key).decode())
    assert authenticator.algorithm == "ES256"
    identity = run(authenticator, jwt.encode(claims(), key, algorithm="ES256"))
    assert isinstance(identity, Identity)
    assert identity.username == "ann"


def test_username_and_rooms_claims_are_configurable() -> None:
    authenticator = JWTAuthenticator(
        secret=SECRET, username_claim="preferred_username", rooms_claim="chat"
    )
    token = hs256_token(claims(sub="ignored", preferred_username="Ann B.", chat=["lobby"]))
    identity = run(authenticator, token)
    assert isinstance(identity, Identity)
    assert identity.username == "Ann B."
    assert identity.rooms == RoomRules.from_claim(["lobby"])
    assert run(
        authenticator, hs256_token(claims(preferred_username="ann", chat="lobby"))
    ) == Refusal(403, "invalid chat claim")


def test_without_required_exp_a_token_never_expires() -> None:
    authenticator = JWTAuthenticator(secret=SECRET, require_exp=False)
    identity = run(authenticator, hs256_token(claims(exp=...)))
    assert isinstance(identity, Identity)
    assert identity.expires_at is None


def test_rooms_claim_becomes_room_rules(hs256: JWTAuthenticator) -> None:
    token = hs256_token(claims(rooms={"join": ["t:*"], "publish": ["t:general"]}))
    identity = run(hs256, token)
    assert isinstance(identity, Identity)
    assert identity.rooms == RoomRules(join=["t:*"], publish=["t:general"])


# --- refusals --------------------------------------------------------------------------


def test_missing_token(hs256: JWTAuthenticator) -> None:
    assert run(hs256) == Refusal(401, "missing token")
    assert run(hs256, headers=[(b"authorization", b"Bearer ")]) == Refusal(401, "missing token")
    assert run(hs256, query=b"token=") == Refusal(401, "missing token")


@pytest.mark.parametrize(
    "token",
    [
        "not-a-jwt",
        "a.b.c",
        "...",
        "e30.e30.",  # {} . {} with no signature
        hs256_token(claims())[:-3] + "AAA",  # tampered signature
        hs256_token(claims()).replace(".", ".x", 1),  # tampered payload
        hs256_token(claims(), secret=OTHER_SECRET),  # signed with another secret
        forged({"alg": "none", "typ": "JWT"}, json.dumps(claims()).encode(), None),
        forged({"alg": "None"}, json.dumps(claims()).encode(), None),
        forged({"alg": "HS512"}, json.dumps(claims()).encode(), SECRET.encode()),
        forged({"typ": "JWT"}, json.dumps(claims()).encode(), SECRET.encode()),  # no alg
        forged({"alg": "HS256"}, b"[1, 2]", SECRET.encode()),  # payload not an object
        forged({"alg": "HS256"}, b"{not json", SECRET.encode()),
        hs256_token(claims(exp="tomorrow")),
        hs256_token(claims(exp=True)),
        hs256_token(claims(exp=10**400)),
        hs256_token(claims(nbf="now")),
    ],
)
def test_invalid_token(hs256: JWTAuthenticator, token: str) -> None:
    assert run(hs256, token) == Refusal(401, "invalid token")


def test_token_too_long(hs256: JWTAuthenticator) -> None:
    token = hs256_token(claims(pad="x" * MAX_TOKEN_LENGTH))
    assert run(hs256, token) == Refusal(401, "token too long")


def test_rs256_refuses_other_keys_and_algorithms(
    rs256: JWTAuthenticator, rsa_private: rsa.RSAPrivateKey, rsa_public_pem: bytes
) -> None:
    payload = json.dumps(claims()).encode()
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    refused = [
        jwt.encode(claims(), other, algorithm="RS256"),  # the wrong key
        forged({"alg": "none"}, payload, None),
        # Key confusion: HS256 "signed" with the public key everyone knows.
        forged({"alg": "HS256", "typ": "JWT"}, payload, rsa_public_pem),
        forged({"alg": "HS256"}, payload, rsa_public_pem.strip()),
        hs256_token(claims()),
        jwt.encode(claims(), rsa_private, algorithm="RS512"),  # right key, other alg
        jwt.encode(claims(), rsa_private, algorithm="PS256"),
    ]
    for token in refused:
        assert run(rs256, token) == Refusal(401, "invalid token"), token


def test_hs256_refuses_asymmetric_tokens(
    hs256: JWTAuthenticator, rsa_private: rsa.RSAPrivateKey
) -> None:
    assert run(hs256, jwt.encode(claims(), rsa_private, algorithm="RS256")) == Refusal(
        401, "invalid token"
    )


def test_expiry_and_leeway(hs256: JWTAuthenticator) -> None:
    token = hs256_token(claims(exp=int(NOW)))
    for now in (NOW - 100, NOW, NOW + 29.5, NOW + 30):  # within the 30 s leeway
        identity = run(hs256, token, now=now)
        assert isinstance(identity, Identity), now
        assert identity.expires_at == NOW
    for now in (NOW + 30.001, NOW + 3600):
        assert run(hs256, token, now=now) == Refusal(401, "token expired")
    strict = JWTAuthenticator(secret=SECRET, leeway=0)
    assert isinstance(run(strict, token, now=NOW), Identity)
    assert run(strict, token, now=NOW + 0.5) == Refusal(401, "token expired")


def test_exp_is_required_by_default(hs256: JWTAuthenticator) -> None:
    assert run(hs256, hs256_token(claims(exp=...))) == Refusal(401, "token has no expiry")


def test_not_before(hs256: JWTAuthenticator) -> None:
    assert run(hs256, hs256_token(claims(nbf=NOW + 31))) == Refusal(401, "token not yet valid")
    for nbf in (NOW + 30, NOW, NOW - 1000):
        assert isinstance(run(hs256, hs256_token(claims(nbf=nbf))), Identity)


def test_audience() -> None:
    authenticator = JWTAuthenticator(secret=SECRET, audience="chat")
    for aud in ("chat", ["billing", "chat"]):
        assert isinstance(run(authenticator, hs256_token(claims(aud=aud))), Identity)
    for wrong in ("billing", ["billing"], [], None, ...):
        token = hs256_token(claims(aud=wrong))
        assert run(authenticator, token) == Refusal(401, "invalid audience"), wrong


def test_a_token_for_an_audience_is_refused_when_none_is_configured(
    hs256: JWTAuthenticator,
) -> None:
    # RFC 7519 4.1.3: a token meant for some other service must not work here.
    assert run(hs256, hs256_token(claims(aud="billing"))) == Refusal(401, "invalid audience")


def test_issuer() -> None:
    authenticator = JWTAuthenticator(secret=SECRET, issuer="https://id.example")
    assert isinstance(run(authenticator, hs256_token(claims(iss="https://id.example"))), Identity)
    for iss in ("https://evil.example", ["https://id.example"], None, ...):
        assert run(authenticator, hs256_token(claims(iss=iss))) == Refusal(401, "invalid issuer")
    # Without a configured issuer, iss is not looked at.
    assert isinstance(run(JWTAuthenticator(secret=SECRET), hs256_token(claims(iss=5))), Identity)


@pytest.mark.parametrize("sub", [..., None, "", 42, ["ann"], "a\nb", "\x00", "u" * 65])
def test_invalid_username_claim(hs256: JWTAuthenticator, sub: object) -> None:
    assert run(hs256, hs256_token(claims(sub=sub))) == Refusal(401, "invalid sub claim")


@pytest.mark.parametrize(
    "rooms",
    [
        None,
        "lobby",
        5,
        True,
        [1],
        [None],
        [""],
        [["lobby"]],
        ["x" * (MAX_ROOM_PATTERN_LENGTH + 1)],
        ["r"] * (MAX_ROOM_PATTERNS + 1),
        {"joins": ["lobby"]},
        {"join": "lobby"},
        {"join": ["lobby"], "publish": None},
        {"presence": [3]},
    ],
)
def test_invalid_rooms_claim(hs256: JWTAuthenticator, rooms: object) -> None:
    assert run(hs256, hs256_token(claims(rooms=rooms))) == Refusal(403, "invalid rooms claim")


def test_refusals_never_contain_the_token(
    hs256: JWTAuthenticator, rsa_private: rsa.RSAPrivateKey
) -> None:
    tokens = [
        hs256_token(claims(exp=1)),
        hs256_token(claims(sub=5)),
        hs256_token(claims(rooms="x")),
        hs256_token(claims(), secret=OTHER_SECRET),
        jwt.encode(claims(), rsa_private, algorithm="RS256"),
    ]
    for token in tokens:
        for headers in (bearer(token), [(b"sec-websocket-protocol", b"bearer." + token.encode())]):
            refusal = run(hs256, headers=headers)
            assert isinstance(refusal, Refusal)
            assert token not in refusal.reason
            for part in token.split("."):
                assert not part or part not in refusal.reason


# --- where the token comes from ----------------------------------------------------------


def test_token_sources() -> None:
    assert token_from_request(b"/ws", b"", [(b"authorization", b"Bearer abc")]) == "abc"
    assert token_from_request(b"/ws", b"", [(b"authorization", b"bearer   abc  ")]) == "abc"
    assert token_from_request(b"/ws", b"", [(b"authorization", b"BEARER abc")]) == "abc"
    protocols = [(b"sec-websocket-protocol", b"roombus, bearer.abc")]
    assert token_from_request(b"/ws", b"", protocols) == "abc"
    split = [(b"sec-websocket-protocol", b"roombus"), (b"sec-websocket-protocol", b"bearer.x")]
    assert token_from_request(b"/ws", b"", split) == "x"
    assert token_from_request(b"/ws", b"room=r&token=abc&token=def", []) == "abc"
    assert token_from_request(b"/ws", b"token=a%2Eb", []) == "a.b"
    assert token_from_request(b"/ws", b"", []) is None
    assert token_from_request(b"/ws", b"token=", []) is None
    assert token_from_request(b"/ws", b"token=%ff", []) is None  # not UTF-8
    assert token_from_request(b"/ws", "token=é".encode(), []) is None  # not ASCII
    # Other schemes and empty values are not bearer tokens.
    assert token_from_request(b"/ws", b"", [(b"authorization", b"Basic YTpi")]) is None
    assert token_from_request(b"/ws", b"", [(b"sec-websocket-protocol", b"bearer.")]) is None
    assert token_from_request(b"/ws", b"", [(b"sec-websocket-protocol", b"Bearer.x")]) is None


def test_token_source_precedence(hs256: JWTAuthenticator) -> None:
    good = hs256_token(claims(sub="good"))
    bad = hs256_token(claims(sub="bad"), secret=OTHER_SECRET)
    auth, proto, query = b"authorization", b"sec-websocket-protocol", b"token="
    order = [
        ([(auth, b"Bearer A"), (proto, b"roombus, bearer.B")], b"token=C", "A"),
        ([(proto, b"roombus, bearer.B")], b"token=C", "B"),
        ([(auth, b"Basic eDp5"), (proto, b"roombus")], b"token=C", "C"),
        ([(auth, b"Basic eDp5"), (auth, b"Bearer A")], b"", "A"),
    ]
    for headers, q, expected in order:
        assert token_from_request(b"/ws", q, headers) == expected
    # The first source with a token decides: a bad one is not rescued by a good one.
    assert run(hs256, headers=bearer(bad), query=query + good.encode()) == Refusal(
        401, "invalid token"
    )
    identity = run(hs256, headers=bearer(good), query=query + bad.encode())
    assert isinstance(identity, Identity)
    assert identity.username == "good"


def test_subprotocol_token(hs256: JWTAuthenticator) -> None:
    token = hs256_token(claims())
    headers = [(b"sec-websocket-protocol", b"roombus, bearer." + token.encode())]
    identity = run(hs256, headers=headers)
    assert isinstance(identity, Identity)
    assert identity.username == "ann"
    assert selected_subprotocol(headers) == SUBPROTOCOL == b"roombus"


def test_bearer_subprotocol_needs_roombus_alongside(hs256: JWTAuthenticator) -> None:
    token = hs256_token(claims())
    refusal = Refusal(400, "offer the 'roombus' subprotocol alongside bearer.<token>")
    for value in (b"bearer." + token.encode(), b"chat, bearer." + token.encode()):
        headers = [(b"sec-websocket-protocol", value)]
        assert selected_subprotocol(headers) is None
        assert run(hs256, headers=headers) == refusal
        # Even when another source carries the token: the response could not name
        # a subprotocol, and browsers fail a handshake that names none.
        assert run(hs256, headers=[*bearer(token), *headers]) == refusal


def test_selected_subprotocol() -> None:
    assert selected_subprotocol([]) is None
    assert selected_subprotocol([(b"sec-websocket-protocol", b"chat")]) is None
    assert selected_subprotocol([(b"sec-websocket-protocol", b" roombus ")]) == b"roombus"
    assert selected_subprotocol([(b"sec-websocket-protocol", b"chat,roombus")]) == b"roombus"
    assert selected_subprotocol([(b"sec-websocket-protocol", b"roombus.v2")]) is None


# --- identities --------------------------------------------------------------------------


def test_identity_claims_are_a_frozen_copy_left_out_of_repr() -> None:
    raw: dict[str, Any] = {"sub": "ann", "secret-ish": "s3cr3t", "rooms": {"join": ["a"]}}
    identity = Identity(username=Username("ann"), claims=raw)
    raw["sub"] = "mallory"
    raw["rooms"]["join"].append("b")
    assert identity.claims["sub"] == "ann"
    assert identity.claims["rooms"] == {"join": ("a",)}
    with pytest.raises(TypeError):
        identity.claims["sub"] = "mallory"  # type: ignore[index]
    assert "s3cr3t" not in repr(identity)
    assert identity == Identity(username=Username("ann"), claims=dict(identity.claims))
    assert hash(identity) == hash(Identity(username=Username("ann")))


def test_identity_defaults() -> None:
    identity = Identity(username=Username("ann"))
    assert (identity.expires_at, identity.rooms, dict(identity.claims)) == (None, None, {})


def test_authenticated_identity_repr_hides_the_claims(hs256: JWTAuthenticator) -> None:
    token = hs256_token(claims(email="ann@example.com"))
    identity = run(hs256, token)
    assert "ann@example.com" not in repr(identity)
    assert token not in repr(identity)


def test_authenticator_repr_hides_the_key(hs256: JWTAuthenticator, rs256: JWTAuthenticator) -> None:
    assert SECRET not in repr(hs256)
    assert repr(rs256) == (
        "JWTAuthenticator(algorithm='RS256', leeway=30.0, audience=None, issuer=None)"
    )


def test_a_custom_authenticator_plugs_in() -> None:
    class CookieAuthenticator:
        def authenticate(
            self, *, path: bytes, query: bytes, headers: Any, now: float
        ) -> Identity | Refusal:
            for name, value in headers:
                if name == b"cookie" and value == b"session=ok":
                    return Identity(username=Username("ann"), expires_at=now + 60)
            return Refusal(401, "no session")

    authenticator: Authenticator = CookieAuthenticator()
    assert run(authenticator, headers=[(b"cookie", b"session=ok")]) == Identity(
        username=Username("ann"), expires_at=NOW + 60
    )
    assert run(authenticator) == Refusal(401, "no session")


# --- room rules and the authorizer ----------------------------------------------------------


def R(name: str) -> RoomName:
    return RoomName(name)


def test_room_rules_list_form_grants_all_three() -> None:
    rules = RoomRules.from_claim(["lobby", "tenant-42:*", "t?"])
    for check in (rules.may_join, rules.may_publish, rules.may_see_presence):
        assert check(R("lobby"))
        assert check(R("tenant-42:general"))
        assert check(R("tenant-42:"))
        assert check(R("t1"))
        assert not check(R("lobby2"))
        assert not check(R("tenant-4:general"))
        assert not check(R("tenant-420"))
        assert not check(R("t"))
        assert not check(R("t12"))


def test_room_rules_mapping_form() -> None:
    rules = RoomRules.from_claim({"join": ["*"], "publish": ["t:general"]})
    assert rules.may_join(R("anything"))
    assert rules.may_publish(R("t:general"))
    assert not rules.may_publish(R("t:random"))
    assert not rules.may_see_presence(R("t:general"))  # a missing key grants nothing
    assert RoomRules.from_claim({}) == RoomRules()


def test_room_rules_wildcards() -> None:
    rules = RoomRules(join=["*"], publish=["a*b*c", "**x**"], presence=["[ab]", "a.b"])
    assert rules.may_join(R("x")) and rules.may_join(R("a" * 64))
    for room in ("abc", "a-b-c", "aabbcc", "abbc", "x", "axb", "xx"):
        assert rules.may_publish(R(room)), room
    for room in ("ab", "acb", "bc", "abcd", "y"):
        assert not rules.may_publish(R(room)), room
    assert not rules.may_see_presence(R("a"))  # [ is literal, not a character class
    assert not rules.may_see_presence(R("axb"))  # . is literal too
    assert rules.may_see_presence(R("a.b"))


def test_room_rules_bounds() -> None:
    RoomRules(join=["r"] * MAX_ROOM_PATTERNS, publish=["x" * MAX_ROOM_PATTERN_LENGTH])
    bad: list[Any] = [
        ["r"] * (MAX_ROOM_PATTERNS + 1),
        ["x" * (MAX_ROOM_PATTERN_LENGTH + 1)],
        [""],
        [5],
        "lobby",  # a string is not a list of patterns
    ]
    for patterns in bad:
        with pytest.raises(ValueError, match="pattern"):
            RoomRules(join=patterns)


def test_pathological_pattern_is_fast() -> None:
    # As a backtracking regex (.*a){63}.*b this would not finish.
    pattern = "*a" * 63 + "*b"
    assert len(pattern) == MAX_ROOM_PATTERN_LENGTH
    rules = RoomRules.from_claim([pattern] * MAX_ROOM_PATTERNS)
    assert not rules.may_join(R("a" * 64))
    assert rules.may_join(R("a" * 63 + "b"))


def test_claims_authorizer() -> None:
    authorizer: Authorizer = ClaimsAuthorizer()
    free = Identity(username=Username("ann"))
    bound = Identity(username=Username("bob"), rooms=RoomRules(join=["t:*"], presence=["t:a"]))
    room = R("t:a")
    assert authorizer.may_join(free, room) and authorizer.may_publish(free, room)
    assert authorizer.may_see_presence(free, room)
    assert authorizer.may_join(bound, room) and not authorizer.may_join(bound, R("u:a"))
    assert not authorizer.may_publish(bound, room)
    assert authorizer.may_see_presence(bound, room)
    assert not authorizer.may_see_presence(bound, R("t:b"))


# --- configuration -----------------------------------------------------------------------


def test_exactly_one_key(rsa_public_pem: bytes) -> None:
    with pytest.raises(ConfigError, match="exactly one"):
        JWTAuthenticator()
    with pytest.raises(ConfigError, match="exactly one"):
        JWTAuthenticator(secret=SECRET, public_key=rsa_public_pem)


@pytest.mark.parametrize(
    "pem",
    [
        b"",
        "not a key",
        b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
    ],
)
def test_bad_public_key(pem: str | bytes) -> None:
    with pytest.raises(ConfigError, match="PEM") as info:
        JWTAuthenticator(public_key=pem)
    assert info.value.setting == "jwt-public-key"


def test_private_key_or_weak_key_is_not_a_public_key(rsa_private: rsa.RSAPrivateKey) -> None:
    private_pem = rsa_private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(ConfigError, match="PEM"):
        JWTAuthenticator(public_key=private_pem)
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(ConfigError, match="2048"):
        JWTAuthenticator(public_key=_public_pem(weak))
    p384 = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(ConfigError, match="P-256") as info:
        JWTAuthenticator(public_key=_public_pem(p384))
    assert info.value.setting == "jwt-public-key"


@pytest.mark.parametrize("secret", ["", "short", "x" * 31, b"\x00" * 31])
def test_short_secret(secret: str | bytes) -> None:
    with pytest.raises(ConfigError, match="at least 32 bytes") as info:
        JWTAuthenticator(secret=secret)
    assert info.value.setting == "jwt-secret"


def test_public_key_as_secret(rsa_public_pem: bytes) -> None:
    with pytest.raises(ConfigError, match="not an HMAC secret"):
        JWTAuthenticator(secret=rsa_public_pem)
    assert JWTAuthenticator(secret=b"\x00" * 32).algorithm == "HS256"


@pytest.mark.parametrize(
    ("options", "setting"),
    [
        ({"leeway": -1}, "jwt-leeway"),
        ({"leeway": float("nan")}, "jwt-leeway"),
        ({"leeway": float("inf")}, "jwt-leeway"),
        ({"leeway": True}, "jwt-leeway"),
        ({"audience": ""}, "jwt-audience"),
        ({"issuer": 5}, "jwt-issuer"),
        ({"username_claim": ""}, "jwt-username-claim"),
        ({"rooms_claim": None}, "jwt-rooms-claim"),
    ],
)
def test_bad_options(options: dict[str, Any], setting: str) -> None:
    with pytest.raises(ConfigError) as info:
        JWTAuthenticator(secret=SECRET, **options)
    assert info.value.setting == setting


def test_pyjwt_is_needed_only_for_jwt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "jwt", None)
    with pytest.raises(ConfigError, match="PyJWT"):
        JWTAuthenticator(secret=SECRET)
    assert ClaimsAuthorizer().may_join(Identity(username=Username("a")), R("r"))


# --- properties --------------------------------------------------------------------------

_header_names = st.sampled_from(
    [b"authorization", b"sec-websocket-protocol", b"cookie", b"host"]
) | st.binary(max_size=20)
_header_values = (
    st.binary(max_size=200)
    | st.binary(max_size=200).map(lambda b: b"Bearer " + b)
    | st.binary(max_size=200).map(lambda b: b"roombus, bearer." + b)
    | st.lists(st.sampled_from(["e30", "eyJhbGciOiJIUzI1NiJ9", "", "x", "AA"]), max_size=4).map(
        lambda parts: b"Bearer " + ".".join(parts).encode()
    )
)
_times = st.floats(allow_nan=False)


@given(
    path=st.binary(max_size=50),
    query=st.binary(max_size=200) | st.binary(max_size=200).map(lambda b: b"token=" + b),
    headers=st.lists(st.tuples(_header_names, _header_values), max_size=6),
    now=_times,
    which=st.booleans(),
)
def test_authenticate_never_raises_on_any_request(
    hs256: JWTAuthenticator,
    rs256: JWTAuthenticator,
    path: bytes,
    query: bytes,
    headers: list[tuple[bytes, bytes]],
    now: float,
    which: bool,
) -> None:
    authenticator = hs256 if which else rs256
    verdict = authenticator.authenticate(path=path, query=query, headers=headers, now=now)
    assert isinstance(verdict, (Identity, Refusal))
    if isinstance(verdict, Refusal):
        assert verdict.status in (400, 401, 403)


_near_now = st.floats(min_value=NOW - 100, max_value=NOW + 100)
_rooms_claims = st.one_of(
    st.lists(st.text("ab*?:[", max_size=6), max_size=4),
    st.dictionaries(
        st.sampled_from(["join", "publish", "presence", "other"]),
        st.lists(st.text("ab*?", max_size=4), max_size=3) | json_values,
        max_size=4,
    ),
    json_values,
)
_CLAIMS = ["sub", "exp", "nbf", "aud", "iss", "rooms"]


@st.composite
def _signed_claims(draw: st.DrawFn) -> object:
    """Good claims for the _strict authenticator, then a few of them spoilt or dropped."""
    claims: dict[str, Any] = {
        "sub": draw(st.sampled_from(["ann", "Ann B."])),
        "exp": NOW + 1000,
        "aud": draw(st.sampled_from(["chat", ["x", "chat"]])),
        "iss": "id",
    }
    claims.update(
        draw(st.fixed_dictionaries({}, optional={"nbf": _near_now, "rooms": _rooms_claims}))
    )
    garbage = st.one_of(_near_now, st.integers(), st.text(max_size=3), json_values)
    claims.update(draw(st.dictionaries(st.sampled_from(_CLAIMS), garbage, max_size=2)))
    for name in draw(st.sets(st.sampled_from(_CLAIMS), max_size=2)):
        claims.pop(name, None)
    claims.update(draw(st.dictionaries(st.text(max_size=5), json_values, max_size=2)))
    return claims


_strict = JWTAuthenticator(secret=SECRET, audience="chat", issuer="id")


@given(
    payload=st.one_of(_signed_claims(), _signed_claims(), _signed_claims(), json_values),
    header=st.fixed_dictionaries(
        {"alg": st.just("HS256")}, optional={"kid": st.text() | json_values}
    ),
    now=_near_now | _times,
)
def test_authenticate_never_raises_on_any_signed_claims(
    payload: object, header: dict[str, Any], now: float
) -> None:
    token = forged(header, json.dumps(payload).encode(), SECRET.encode())
    verdict = run(_strict, token, now=now)
    event(verdict.reason if isinstance(verdict, Refusal) else "accepted")
    assert isinstance(verdict, (Identity, Refusal))
    if isinstance(verdict, Identity):
        assert isinstance(payload, dict)
        assert is_valid_username(verdict.username)
        assert verdict.username == payload["sub"]
        assert payload["iss"] == "id"
        assert (verdict.rooms is None) is ("rooms" not in payload)


@functools.cache
def _reference_match(pattern: str, name: str) -> bool:
    """Glob matching by its definition: * is any run, ? any one character, all else literal."""
    if not pattern:
        return not name
    if pattern[0] == "*":
        return _reference_match(pattern[1:], name) or (
            bool(name) and _reference_match(pattern, name[1:])
        )
    if name and (pattern[0] == "?" or pattern[0] == name[0]):
        return _reference_match(pattern[1:], name[1:])
    return False


@given(
    patterns=st.lists(st.text("ab:*?[", min_size=1, max_size=8), max_size=4),
    name=st.text("ab:[", min_size=1, max_size=10),
)
def test_room_rules_agree_with_a_reference_matcher(patterns: list[str], name: str) -> None:
    rules = RoomRules.from_claim(patterns)
    expected = any(_reference_match(p, name) for p in patterns)
    assert rules.may_join(R(name)) is expected
    assert rules.may_publish(R(name)) is expected
    if not any("[" in p for p in patterns):
        assert expected is any(fnmatch.fnmatchcase(name, p) for p in patterns)


@given(
    exp=st.integers(min_value=0, max_value=2**40) | st.floats(min_value=0, max_value=1e12),
    leeway=st.floats(min_value=0, max_value=1000),
    delta=st.floats(min_value=-2000, max_value=2000) | st.sampled_from([0.0, 30.0, 30.5]),
)
def test_accepted_iff_now_within_exp_plus_leeway(exp: float, leeway: float, delta: float) -> None:
    authenticator = JWTAuthenticator(secret=SECRET, leeway=leeway)
    now = exp + delta
    verdict = run(authenticator, hs256_token(claims(exp=exp)), now=now)
    if now <= exp + leeway:
        assert isinstance(verdict, Identity)
        assert verdict.expires_at == exp
    else:
        assert verdict == Refusal(401, "token expired")
