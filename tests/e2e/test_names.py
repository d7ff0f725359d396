"""
Names and content at the edge, end to end: a lone surrogate (valid JSON, no UTF-8
form) or a format character in a username, a room or chat content, and token claims
nested deep enough to exhaust the stack, get the refusal the protocol names (400,
401, an ``error``) from every transport; nothing gets in to fail later.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from urllib.parse import quote

import pytest

from roombus.server.auth import JWTAuthenticator

from .conftest import open_client
from .rawws import http_exchange, response_head, upgrade_request

SECRET = "s3cret-for-tests-only-0123456789abcdef"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def signed(claims_json: str) -> str:
    """An HS256 token over the JSON text *claims_json* (by hand: it may hold a lone
    surrogate's escape, or nesting no encoder would write)."""
    signing_input = _b64(b'{"alg":"HS256","typ":"JWT"}') + "." + _b64(claims_json.encode())
    mac = hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + _b64(mac)


def claims(sub_json: str, extra: str = "") -> str:
    return f'{{"sub":{sub_json},"exp":{int(time.time()) + 3600}{extra}}}'


@pytest.mark.parametrize(
    ("token", "why"),
    [
        pytest.param(signed(claims('"x\\ud800"')), "lone surrogate", id="lone-surrogate"),
        pytest.param(signed(claims('"evil\\u202enimda"')), "bidi override", id="bidi"),
        pytest.param(signed(claims('"\\u200bann"')), "zero width space", id="zero-width"),
        pytest.param(
            signed(claims('"ann"', ',"x":' + "[" * 600 + "]" * 600)), "600 levels", id="nested"
        ),
    ],
)
def test_a_token_naming_no_displayable_user_or_nested_deeply_gets_401(make_server, token, why):
    srv = make_server(extra={"authenticator": JWTAuthenticator(secret=SECRET)})
    resp = http_exchange(srv.port, upgrade_request("/ws?room=lobby&token=" + token))
    assert resp.status == 401, (why, resp)
    assert resp.headers.get("www-authenticate") == "Bearer"
    # The server is fine: a good token still gets in.
    good = signed(claims('"ann"'))
    assert response_head(srv.port, upgrade_request("/ws?room=lobby&token=" + good)) == 101


@pytest.mark.parametrize(
    "query",
    [
        "room=lobby&username=" + quote("evil\u202enimda"),
        "room=lobby&username=" + quote("\ufeffann"),
        "room=lobby&username=ann%ED%A0%80",  # a surrogate's would-be UTF-8: not UTF-8
        "room=lobby%ED%A0%80&username=ann",
    ],
    ids=["bidi", "bom", "surrogate-username", "surrogate-room"],
)
def test_a_url_name_that_is_not_displayable_text_gets_400(make_server, query):
    srv = make_server()
    assert http_exchange(srv.port, upgrade_request("/ws?" + query)).status == 400


@pytest.mark.parametrize(
    "message",
    [
        '{"type":"chat","content":"x\\ud800"}',
        '{"type":"chat","content":{"k":["ok","\\udfff"]}}',
        '{"type":"chat","content":{"\\udc00":1}}',
    ],
    ids=["string", "nested", "key"],
)
def test_chat_content_with_a_lone_surrogate_gets_an_error_and_reaches_nobody(make_server, message):
    srv = make_server()
    ann = open_client(srv.port, "lobby", "ann")
    bob = open_client(srv.port, "lobby", "bob")
    ann.expect(type="presence", event="join", username="bob")
    ann.send(message)
    error = ann.expect(type="error", code="bad_message")
    assert "surrogate" in error["content"]
    ann.chat("fine")  # the connection goes on
    bob.expect_chat("fine", "ann")  # the first chat bob sees: the refused one never came
    assert ann.expect_chat("fine", "ann")["seq"] == 1


def test_a_room_with_a_lone_surrogate_is_an_invalid_room(make_server):
    srv = make_server()
    ann = open_client(srv.port, "lobby", "ann")
    for kind in ("join", "leave", "chat"):
        ann.send(json.dumps({"type": kind, "room": "r\ud800", "content": 1}))
        ann.expect(type="error", code="invalid_room")
    ann.ping()
