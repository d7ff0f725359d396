"""Routing of the opening request: statuses for every refusal, and the upgrade."""

from __future__ import annotations

import base64
import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from roombus.core.streams import Position
from roombus.server.handshake import (
    HttpResponse,
    Upgrade,
    accept_token,
    route_request,
    route_websocket,
)
from roombus.server.http import StaticFile, response_head

KEY = base64.b64encode(b"0123456789abcdef")
UPGRADE = [
    (b"host", b"x"),
    (b"upgrade", b"websocket"),
    (b"connection", b"keep-alive, Upgrade"),
    (b"sec-websocket-version", b"13"),
    (b"sec-websocket-key", KEY),
]


def test_rfc6455_example_accept_token() -> None:
    assert accept_token(b"dGhlIHNhbXBsZSBub25jZQ==") == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_upgrade() -> None:
    decision = route_request(b"GET", b"/ws?room=lobby&username=ann%20b", UPGRADE)
    assert decision == Upgrade(room="lobby", username="ann b", accept=accept_token(KEY))


def test_first_of_repeated_parameters_wins() -> None:
    decision = route_request(b"GET", b"/ws?room=a&room=b&username=u&username=v", UPGRADE)
    assert isinstance(decision, Upgrade)
    assert (decision.room, decision.username) == ("a", "u")


@pytest.mark.parametrize(
    ("method", "target", "headers", "status"),
    [
        (b"GET", b"/ws?room=lobby", UPGRADE, 400),
        (b"GET", b"/ws?username=ann", UPGRADE, 400),
        (b"GET", b"/ws?room=&username=ann", UPGRADE, 400),
        (b"GET", b"/ws?room=lobby&username=", UPGRADE, 400),
        (b"GET", b"/ws?room=a%20b&username=ann", UPGRADE, 400),
        (b"GET", b"/ws?room=" + b"r" * 65 + b"&username=ann", UPGRADE, 400),
        (b"GET", b"/ws?room=lobby&username=" + b"u" * 65, UPGRADE, 400),
        (b"GET", b"/ws?room=lobby&username=a%0Ab", UPGRADE, 400),
        (b"GET", b"/ws?room=lobby&username=%ff", UPGRADE, 400),
        (b"GET", b"/ws?room=lobby&username=ann", [(b"host", b"x")], 426),
        (
            b"GET",
            b"/ws?room=lobby&username=ann",
            [*UPGRADE[:3], (b"sec-websocket-version", b"8"), *UPGRADE[4:]],
            426,
        ),
        (b"GET", b"/ws?room=lobby&username=ann", UPGRADE[:4], 400),
        (
            b"GET",
            b"/ws?room=lobby&username=ann",
            [*UPGRADE[:4], (b"sec-websocket-key", b"!!")],
            400,
        ),
        (b"POST", b"/ws?room=lobby&username=ann", UPGRADE, 405),
        (b"GET", b"/nope", [], 404),
        (b"GET", b"/", [], 404),
    ],
)
def test_refusals(method: bytes, target: bytes, headers: list, status: int) -> None:
    decision = route_request(method, target, headers)
    assert isinstance(decision, HttpResponse)
    assert decision.status == status


def test_origin_allow_list() -> None:
    allowed = frozenset({"https://chat.example.com"})
    target = b"/ws?room=lobby&username=ann"
    refused = route_request(b"GET", target, UPGRADE, allowed_origins=allowed)
    assert isinstance(refused, HttpResponse) and refused.status == 403
    evil = [*UPGRADE, (b"origin", b"https://evil.example")]
    refused = route_request(b"GET", target, evil, allowed_origins=allowed)
    assert isinstance(refused, HttpResponse) and refused.status == 403
    good = [*UPGRADE, (b"origin", b"HTTPS://Chat.Example.com/")]
    assert isinstance(route_request(b"GET", target, good, allowed_origins=allowed), Upgrade)


def test_page_and_health() -> None:
    page = route_request(b"GET", b"/", [], page=b"<html>")
    assert isinstance(page, HttpResponse) and (page.status, page.body) == (200, b"<html>")
    health = route_request(b"GET", b"/healthz", [])
    assert isinstance(health, HttpResponse) and health.status == 200


SCRIPT = StaticFile(body=b"export const x = 1;\n", content_type=b"text/javascript; charset=utf-8")
TAG = b'"' + hashlib.sha256(SCRIPT.body).hexdigest()[:16].encode() + b'"'


def _script(method: bytes = b"GET", *if_none_match: bytes) -> HttpResponse:
    headers = [(b"host", b"x"), *((b"if-none-match", value) for value in if_none_match)]
    decision = route_request(method, b"/roombus.js", headers, script=SCRIPT)
    assert isinstance(decision, HttpResponse)
    return decision


def test_the_script_has_a_strong_etag_computed_once() -> None:
    assert SCRIPT.etag == TAG
    assert SCRIPT.etag is SCRIPT.etag  # an attribute, not hashed again per request
    with pytest.raises(TypeError):
        StaticFile(body=b"", content_type=b"x/y", etag=b'"forged"')  # type: ignore[call-arg]
    assert "bytes" in repr(SCRIPT) and "export" not in repr(SCRIPT)  # no 26 KiB repr
    other = StaticFile(body=b"export const x = 2;\n", content_type=SCRIPT.content_type)
    assert other.etag != TAG and other.etag.startswith(b'"') and len(other.etag) == 18


@pytest.mark.parametrize("method", [b"GET", b"HEAD"])
def test_the_script_is_served_with_its_etag_and_no_cache(method: bytes) -> None:
    # HEAD gets the same decision, body and length included: the transport leaves the
    # body out (as for the page), so Content-Length is the GET's.
    response = _script(method)
    assert (response.status, response.body) == (200, SCRIPT.body)
    assert response_head(response) == [
        (b"content-type", b"text/javascript; charset=utf-8"),
        (b"content-length", b"%d" % len(SCRIPT.body)),
        (b"connection", b"close"),
        (b"cache-control", b"no-cache"),
        (b"etag", TAG),
    ]
    # The query string does not matter (a cache-busting ?v=).
    busted = route_request(method, b"/roombus.js?v=3", [], script=SCRIPT)
    assert isinstance(busted, HttpResponse) and busted.body == SCRIPT.body


@pytest.mark.parametrize(
    "values",
    [
        pytest.param([TAG], id="the-tag"),
        pytest.param([b"W/" + TAG], id="weak-comparison"),
        pytest.param([b"*"], id="star"),
        pytest.param([b" \t* "], id="star-with-whitespace"),
        pytest.param([b'"0000000000000000", ' + TAG], id="second-of-a-list"),
        pytest.param([b'W/"a",W/' + TAG + b' , "b"'], id="list-without-spaces"),
        pytest.param([b", ," + TAG + b",,"], id="empty-list-members"),
        pytest.param([b'"a,b", ' + TAG], id="comma-inside-a-tag"),
        pytest.param([b'"a"', TAG], id="second-header-line"),
    ],
)
@pytest.mark.parametrize("method", [b"GET", b"HEAD"])
def test_if_none_match_naming_the_tag_is_answered_304(method: bytes, values: list) -> None:
    response = _script(method, *values)
    assert (response.status, response.body) == (304, b"")
    # What a 200 would carry for caches (ETag, Cache-Control), no content fields.
    assert response_head(response) == [
        (b"connection", b"close"),
        (b"cache-control", b"no-cache"),
        (b"etag", TAG),
    ]


@pytest.mark.parametrize(
    "values",
    [
        pytest.param([b'"0000000000000000"'], id="another-tag"),
        pytest.param([TAG[1:-1]], id="unquoted"),
        pytest.param([TAG.upper()], id="case-matters"),
        pytest.param([b"w/" + TAG], id="lower-case-w"),
        pytest.param([b"W/ " + TAG], id="space-after-W/"),
        pytest.param([b"*, " + TAG[:-1]], id="star-in-a-list-and-a-cut-tag"),
        pytest.param([b'"a" garbage ' + TAG], id="after-garbage"),
        pytest.param([b""], id="empty"),
        pytest.param([TAG + TAG], id="two-tags-without-a-comma"),
    ],
)
def test_if_none_match_not_naming_the_tag_gets_the_file(values: list) -> None:
    response = _script(b"GET", *values)
    assert (response.status, response.body) == (200, SCRIPT.body)
    assert (b"etag", TAG) in response.headers


def test_without_a_script_it_is_404_and_other_answers_keep_no_store() -> None:
    for script in (None, SCRIPT):
        missing = route_request(b"GET", b"/roombus.js", [], script=script, page=b"<html>")
        assert isinstance(missing, HttpResponse)
        assert missing.status == (404 if script is None else 200)
        page = route_request(b"GET", b"/", [(b"if-none-match", b"*")], script=script, page=b"x")
        assert isinstance(page, HttpResponse) and page.status == 200  # the page has no tag
        assert (b"cache-control", b"no-store") in response_head(page)
    assert route_request(b"GET", b"/roombus.js", []).status == 404  # type: ignore[union-attr]
    refused = route_request(b"POST", b"/roombus.js", [], script=SCRIPT)
    assert isinstance(refused, HttpResponse) and refused.status == 405
    nested = route_request(b"GET", b"/js/roombus.js", [], script=SCRIPT)
    assert isinstance(nested, HttpResponse) and nested.status == 404


@given(
    method=st.binary(max_size=8),
    target=st.binary(max_size=200),
    headers=st.lists(st.tuples(st.binary(max_size=20), st.binary(max_size=60)), max_size=8),
)
def test_any_request_gets_a_decision(method: bytes, target: bytes, headers: list) -> None:
    decision = route_request(method, target, headers, allowed_origins=frozenset({"https://a"}))
    if isinstance(decision, HttpResponse):
        assert 200 <= decision.status < 600
    else:
        assert isinstance(decision, Upgrade)


@pytest.mark.parametrize(
    ("query", "positioned", "since", "partial"),
    [
        (b"", False, None, False),
        (b"&since=", True, None, False),
        (b"&since=Ab_-9:41", True, Position("Ab_-9", 41), False),
        (b"&since=e1:0&partial=1", True, Position("e1", 0), True),
        (b"&since=e1:7&partial=0", True, Position("e1", 7), False),
        (b"&since=e1:7&partial=true&since=x:1", True, Position("e1", 7), True),
        # An empty or false partial= asks for the whole replay; the first one counts.
        (b"&since=e1:7&partial=", True, Position("e1", 7), False),
        (b"&since=e1:7&partial=false", True, Position("e1", 7), False),
        (b"&since=e1:7&partial=0&partial=1", True, Position("e1", 7), False),
        (b"&since=e1:" + b"9" * 19, True, Position("e1", 10**19 - 1), False),
    ],
)
def test_a_position_in_the_query(
    query: bytes, positioned: bool, since: Position | None, partial: bool
) -> None:
    decision = route_request(b"GET", b"/ws?room=lobby&username=ann" + query, UPGRADE)
    assert isinstance(decision, Upgrade)
    assert (decision.positioned, decision.since, decision.partial) == (positioned, since, partial)


@pytest.mark.parametrize(
    "query",
    [
        b"&since=e1",
        b"&since=:5",
        b"&since=e1:",
        b"&since=e1:-1",
        b"&since=e1:1.5",
        b"&since=e%201:1",
        b"&since=" + b"e" * 33 + b":1",
        b"&since=e1:" + b"9" * 20,
        b"&since=e1:%d9%a3",  # a non-ASCII digit
        b"&since=e1:1&partial=yes",
    ],
)
def test_a_malformed_position_is_refused_with_400(query: bytes) -> None:
    decision = route_request(b"GET", b"/ws?room=lobby&username=ann" + query, UPGRADE)
    assert isinstance(decision, HttpResponse) and decision.status == 400
    assert b"since" in decision.body or b"partial" in decision.body


def test_an_unsupported_websocket_version_is_named_with_the_one_spoken() -> None:
    headers = [*UPGRADE[:3], (b"sec-websocket-version", b"8"), *UPGRADE[4:]]
    decision = route_request(b"GET", b"/ws?room=lobby&username=ann", headers)
    assert isinstance(decision, HttpResponse)
    assert decision.status == 426
    assert decision.body == b"unsupported WebSocket version (13 only)\n"
    assert (b"sec-websocket-version", b"13") in decision.headers


def test_a_websocket_an_asgi_server_passes_with_a_bad_key_is_refused_saying_so() -> None:
    """An ASGI server checked the handshake, but not every one checks the key."""
    refused = route_websocket(
        b"/ws?room=lobby&username=ann", [(b"sec-websocket-key", b"not a key")]
    )
    assert isinstance(refused, HttpResponse)
    assert (refused.status, refused.body) == (400, b"missing or invalid Sec-WebSocket-Key\n")
