"""
Names and content at the edge: what cannot be encoded as UTF-8 (a lone surrogate),
what displays as something else (Unicode format characters), and token claims nested
deeply enough to exhaust the stack are refused where they enter, with the status or
``error`` the protocol names, never later inside the broker or the backplane.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import unicodedata
from typing import Any
from urllib.parse import quote

import jwt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from roombus import BrokerConfig, Username, is_valid_username
from roombus.core.auth import Identity, RoomRules
from roombus.core.codec import BAD_MESSAGE, decode_request, encode_chat
from roombus.lowlevel import Broker
from roombus.server.auth import MAX_CLAIMS_DEPTH, JWTAuthenticator, Refusal
from roombus.server.handshake import HttpResponse, Upgrade, route_request, route_websocket

from ..helpers import connect, inbox, send

SECRET = "roombus-test-secret-0123456789abcdef"
NOW = 1_700_000_000.0

#: Format characters (Unicode category Cf) that make a name display as another.
FORMAT_CHARACTERS = ["\u202e", "\u202d", "\u2066", "\u200b", "\u200d", "\ufeff", "\u00ad"]
LONE_SURROGATES = ["\ud800", "\udbff", "\udc00", "\udfff"]

_UPGRADE_HEADERS = [
    (b"host", b"localhost"),
    (b"upgrade", b"websocket"),
    (b"connection", b"Upgrade"),
    (b"sec-websocket-version", b"13"),
    (b"sec-websocket-key", b"dGhlIHNhbXBsZSBub25jZQ=="),
]


def _route(target: str, *extra: tuple[bytes, bytes], authenticated: bool = False) -> Any:
    return route_request(
        b"GET",
        target.encode("ascii"),
        [*_UPGRADE_HEADERS, *extra],
        authenticator=JWTAuthenticator(secret=SECRET) if authenticated else None,
        now=NOW,
    )


def _token(**claims: Any) -> str:
    return jwt.encode({"exp": int(NOW) + 60, **claims}, SECRET, algorithm="HS256")


def _signed(claims: bytes) -> str:
    """An HS256 token over the JSON text *claims*, built by hand: PyJWT cannot encode
    a value nested as deeply as some of these tests want."""

    def b64(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    signing_input = b64(b'{"alg":"HS256","typ":"JWT"}') + b"." + b64(claims)
    mac = hmac.new(SECRET.encode(), signing_input, hashlib.sha256).digest()
    return (signing_input + b"." + b64(mac)).decode("ascii")


def _bearer(token: str) -> tuple[bytes, bytes]:
    return (b"authorization", b"Bearer " + token.encode("ascii"))


# --- the name grammar ----------------------------------------------------------------------


@pytest.mark.parametrize("bad", LONE_SURROGATES + FORMAT_CHARACTERS)
def test_usernames_with_a_lone_surrogate_or_a_format_character_are_invalid(bad: str) -> None:
    assert not is_valid_username("x" + bad)
    assert not is_valid_username(bad)
    assert not is_valid_username("evil" + bad + "nimda")


@given(
    st.text(
        st.characters() | st.sampled_from([*LONE_SURROGATES, *FORMAT_CHARACTERS, "a", "\x85"]),
        min_size=1,
        max_size=64,
    )
)
def test_a_username_is_valid_iff_it_has_no_control_format_or_surrogate_character(
    name: str,
) -> None:
    expected = not any(unicodedata.category(c) in ("Cc", "Cf", "Cs") for c in name)
    assert is_valid_username(name) == expected
    if expected:
        name.encode("utf-8")  # what the backplane will do with it


@pytest.mark.parametrize("good", ["ann", "é", "😀", "名前", "a b", "x" * 64, "مرحبا"])
def test_ordinary_names_stay_valid(good: str) -> None:
    assert is_valid_username(good)


# --- the URL ------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", FORMAT_CHARACTERS)
def test_a_url_username_with_a_format_character_gets_400(bad: str) -> None:
    response = _route("/ws?room=lobby&username=" + quote("evil" + bad + "nimda"))
    assert isinstance(response, HttpResponse) and response.status == 400
    assert b"format" in response.body


@pytest.mark.parametrize("escaped", ["%ED%A0%80", "%ED%BF%BF", "%ED%A0%80%ED%B0%80"])
@pytest.mark.parametrize("param", ["username", "room"])
def test_a_url_param_that_is_an_encoded_surrogate_gets_400(param: str, escaped: str) -> None:
    query = {"room": "lobby", "username": "ann", param: "x" + escaped}
    target = "/ws?" + "&".join(f"{k}={v}" for k, v in query.items())
    response = _route(target)
    assert isinstance(response, HttpResponse) and response.status == 400


def test_an_asgi_path_with_a_lone_surrogate_is_not_the_websocket_path() -> None:
    # An ASGI server hands the path over decoded, as str; one that kept an undecodable
    # byte as a surrogate must not have it read as "/ws" with a query.
    from roombus.asgi import _target

    scope = {"path": "/ws\udcff", "query_string": b"room=lobby&username=ann"}
    target = _target(scope)
    assert isinstance(route_websocket(target, []), HttpResponse)
    assert route_websocket(target, []).status == 404  # type: ignore[union-attr]


# --- token claims --------------------------------------------------------------------------


@pytest.mark.parametrize("bad", LONE_SURROGATES + FORMAT_CHARACTERS)
def test_a_token_whose_sub_cannot_be_shown_faithfully_gets_401(bad: str) -> None:
    token = _token(sub="x" + bad)  # valid JSON: a lone surrogate travels as "\ud800"
    verdict = JWTAuthenticator(secret=SECRET).authenticate(
        path=b"/ws", query=b"", headers=[_bearer(token)], now=NOW
    )
    assert verdict == Refusal(401, "invalid sub claim")
    response = _route("/ws?room=lobby", _bearer(token), authenticated=True)
    assert isinstance(response, HttpResponse) and response.status == 401


@pytest.mark.parametrize("bad", LONE_SURROGATES)
@pytest.mark.parametrize("shape", ["list", "object"])
def test_a_rooms_claim_pattern_with_a_lone_surrogate_is_refused(bad: str, shape: str) -> None:
    patterns = ["lobby", "x" + bad]
    claim = patterns if shape == "list" else {"join": patterns}
    token = _token(sub="ann", rooms=claim)
    verdict = JWTAuthenticator(secret=SECRET).authenticate(
        path=b"/ws", query=b"", headers=[_bearer(token)], now=NOW
    )
    assert verdict == Refusal(403, "invalid rooms claim")
    with pytest.raises(ValueError, match="UTF-8"):
        RoomRules(join=patterns)


# --- messages ------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", LONE_SURROGATES)
@pytest.mark.parametrize(
    "content",
    ['"x{}"', '["ok", "{}"]', '{{"k{}": 1}}', '{{"k": {{"deeper": ["{}"]}}}}'],
)
def test_chat_content_with_a_lone_surrogate_is_refused_with_an_error(
    content: str, bad: str
) -> None:
    escaped = json.dumps(bad)[1:-1]  # "\ud800" as JSON spells it
    text = '{"type":"chat","content":' + content.format(escaped) + "}"
    assert encode_chat("ann", decode_request(text).content, "lobby", 1, 1) is None  # type: ignore[union-attr]

    broker = Broker(BrokerConfig())
    connect(broker, 1, "ann", "lobby")
    connect(broker, 2, "bob", "lobby")
    actions = send(broker, 1, text)
    assert [m["type"] for m in inbox(actions, 2)] == []  # nothing reaches the room
    (error,) = inbox(actions, 1)
    assert error["type"] == "error" and error["code"] == BAD_MESSAGE
    assert "surrogate" in error["content"]
    assert broker.seq("lobby") == 0


@pytest.mark.parametrize("kind", ["join", "leave", "chat"])
def test_a_room_field_with_a_lone_surrogate_is_an_invalid_room(kind: str) -> None:
    request = decode_request('{"type":"' + kind + '","room":"lobby\\ud800","content":1}')
    assert getattr(request, "code", None) == "invalid_room"


@pytest.mark.parametrize("bad", LONE_SURROGATES)
def test_server_publish_refuses_what_cannot_be_encoded(bad: str) -> None:
    broker = Broker(BrokerConfig())
    connect(broker, 1, "ann", "lobby")
    with pytest.raises(ValueError, match="surrogate"):
        broker.publish("lobby", "x" + bad, username="server", timestamp=1)
    with pytest.raises(ValueError, match="surrogate"):
        broker.publish("lobby", {"a": ["x" + bad]}, username="server", timestamp=1)
    with pytest.raises(ValueError, match="username"):
        broker.publish("lobby", "hi", username="x" + bad, timestamp=1)
    with pytest.raises(ValueError, match="username"):
        broker.publish("lobby", "hi", username="evil\u202enimda", timestamp=1)
    assert broker.seq("lobby") == 0


# --- nesting --------------------------------------------------------------------------------


def _nested(depth: int) -> object:
    value: object = "leaf"
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


@pytest.mark.parametrize("depth", [MAX_CLAIMS_DEPTH, MAX_CLAIMS_DEPTH + 1, 600, 2000])
def test_deeply_nested_claims_are_refused_with_401(depth: int) -> None:
    # The claims object is one level; built as text, as json.dumps would recurse.
    inner = "[" * (depth - 1) + "]" * (depth - 1)
    token = _signed(b'{"sub":"ann","exp":%d,"x":%s}' % (int(NOW) + 60, inner.encode()))
    verdict = JWTAuthenticator(secret=SECRET).authenticate(
        path=b"/ws", query=b"", headers=[_bearer(token)], now=NOW
    )
    if depth <= MAX_CLAIMS_DEPTH:
        assert isinstance(verdict, Identity) and verdict.username == Username("ann")
    else:
        assert verdict == Refusal(401, "invalid token")
        response = _route("/ws?room=lobby", _bearer(token), authenticated=True)
        assert isinstance(response, HttpResponse) and response.status == 401


@pytest.mark.parametrize("depth", [MAX_CLAIMS_DEPTH + 1, 600, 2000])
def test_a_deeply_nested_token_header_is_refused_with_401(depth: int) -> None:
    header = b'{"alg":"HS256","x":' + b"[" * depth + b"]" * depth + b"}"
    token = _token(sub="ann")
    forged = base64.urlsafe_b64encode(header).rstrip(b"=").decode() + token[token.index(".") :]
    verdict = JWTAuthenticator(secret=SECRET).authenticate(
        path=b"/ws", query=b"", headers=[_bearer(forged)], now=NOW
    )
    assert verdict == Refusal(401, "invalid token")


def test_brackets_inside_strings_are_not_nesting() -> None:
    token = _token(sub="ann", note="[[[[{{{{" * 100 + '\\"[[[', deep=_nested(3))
    verdict = JWTAuthenticator(secret=SECRET).authenticate(
        path=b"/ws", query=b"", headers=[_bearer(token)], now=NOW
    )
    assert isinstance(verdict, Identity)


def test_an_accepted_identity_is_still_an_upgrade() -> None:
    response = _route("/ws?room=lobby", _bearer(_token(sub="ann")), authenticated=True)
    assert isinstance(response, Upgrade) and response.username == "ann"


def test_one_grammar_for_rooms_node_ids_and_the_bundled_page() -> None:
    """Room names, node ids and key prefixes share TOKEN_PATTERN; the bundled page
    checks a room name with the same pattern before it connects."""
    from importlib import resources

    from roombus.cluster.room import is_valid_node_id
    from roombus.core.names import TOKEN_PATTERN, is_token, is_valid_room

    for name in ("a", "x" * 64, "a.b:c-d_e", "", "x" * 65, "a b", "{a}", "é"):
        assert is_valid_room(name) == is_valid_node_id(name) == is_token(name)
    page = (resources.files("roombus") / "_static" / "chat.html").read_text(encoding="utf-8")
    assert f"const ROOM_RE = /^{TOKEN_PATTERN}$/;" in page
