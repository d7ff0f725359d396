"""
Fuzzing the opening handshake: arbitrary bytes, and valid requests damaged at random,
into the wire layer and the router. The answer is always an HTTP response with a status
the protocol names, a 101 upgrade, or nothing (the peer left before a whole request);
never an exception.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json
import math
import unicodedata
from typing import Any
from urllib.parse import quote

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st

from roombus import BrokerConfig, ServerConfig
from roombus.hub import Hub
from roombus.server.auth import MAX_CLAIMS_DEPTH, JWTAuthenticator
from roombus.server.handshake import HttpResponse, Upgrade, route_request

from .pipeline import HttpAnswer, Pipeline, WebSocketAnswer, read_answer

#: Fuzzers get more examples than other properties (three times the profile's).
FUZZ = settings(max_examples=3 * settings.default.max_examples)

KEY = base64.b64encode(b"0123456789abcdef")
VALID = (
    b"GET /ws?room=lobby&username=ann HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + KEY + b"\r\n\r\n"
)
OTHER_REQUESTS = [
    b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
    b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /ws HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc",
    b"GET /ws HTTP/1.0\r\n\r\n",
    b"GET /ws?room=a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
]

mutation = st.one_of(
    st.tuples(st.just("cut"), st.integers(0, 400), st.integers(0, 40)),
    st.tuples(st.just("insert"), st.integers(0, 400), st.binary(min_size=1, max_size=12)),
    st.tuples(st.just("flip"), st.integers(0, 400), st.integers(1, 255)),
    st.tuples(
        st.just("header"),
        st.integers(0, 4),
        st.binary(max_size=30)
        | st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=30).map(str.encode),
    ),
    st.tuples(
        st.just("insert"),
        st.integers(0, 400),
        st.sampled_from(
            [
                b"\r\n",
                b"\n",
                b":",
                b" ",
                b"\x00",
                b"\xff",
                b"%",
                b"?",
                b"&room=",
                b"Upgrade: h2c\r\n",
            ]
        ),
    ),
)


HEADERS = [b"Upgrade", b"Connection", b"Sec-WebSocket-Version", b"Sec-WebSocket-Key", b"Host"]


def mutate(data: bytes, mutations: list[tuple[str, int, object]]) -> bytes:
    for kind, at, arg in mutations:
        if kind == "header":  # replace one header's value with arbitrary bytes
            name = HEADERS[at % len(HEADERS)] + b": "
            start = data.find(name)
            if start >= 0:
                start += len(name)
                end = data.find(b"\r\n", start)
                data = data[:start] + arg + data[end if end >= 0 else len(data) :]  # type: ignore[operator]
            continue
        at = at % (len(data) + 1)
        if kind == "cut":
            data = data[:at] + data[at + arg :]  # type: ignore[operator]
        elif kind == "insert":
            data = data[:at] + arg + data[at:]  # type: ignore[operator]
        elif at < len(data):
            data = data[:at] + bytes([data[at] ^ arg]) + data[at + 1 :]  # type: ignore[operator]
    return data


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def serve(chunks: list[bytes], **route: object) -> tuple[Pipeline, bytes]:
    pipeline = Pipeline(**route)  # type: ignore[arg-type]
    for chunk in chunks:
        pipeline.feed(chunk)
    pipeline.feed(None)
    return pipeline, pipeline.out


def check(pipeline: Pipeline, out: bytes, request: bytes) -> None:
    answer = read_answer(out, head=request.startswith(b"HEAD"))
    if isinstance(answer, WebSocketAnswer):
        # Upgraded, then the stream ended: the client is gone and forgotten.
        assert answer.envelopes[-1]["type"] == "presence_state"
    # Whatever happened, nothing is left behind.
    assert pipeline.broker.statistics().connections == 0
    assert pipeline.broker.rooms == []
    # And nothing more is said once the connection is over.
    pipeline.feed(b"GET / HTTP/1.1\r\n\r\n")
    assert pipeline.out == out


@FUZZ
@given(st.binary(max_size=600), st.lists(st.integers(0, 600), max_size=6))
def test_arbitrary_bytes_get_an_http_status_or_nothing(data: bytes, cuts: list[int]) -> None:
    pipeline, out = serve(chunked(data, cuts))
    check(pipeline, out, data)
    assert not isinstance(read_answer(out), WebSocketAnswer) or data.startswith(b"GET ")


@FUZZ
@given(
    base=st.sampled_from([VALID, VALID, *OTHER_REQUESTS]),
    mutations=st.lists(mutation, max_size=4),
    cuts=st.lists(st.integers(0, 600), max_size=6),
    origins=st.booleans(),
)
def test_damaged_requests_get_an_http_status_or_an_upgrade(
    base: bytes, mutations: list[tuple[str, int, object]], cuts: list[int], origins: bool
) -> None:
    request = mutate(base, mutations)
    route = {"allowed_origins": frozenset({"https://ok.example"})} if origins else {}
    pipeline, out = serve(chunked(request, cuts), **route)
    check(pipeline, out, request)
    answer = read_answer(out, head=request.startswith(b"HEAD"))
    if request == VALID and not origins:
        assert isinstance(answer, WebSocketAnswer)
    if isinstance(answer, HttpAnswer) and answer.status >= 400 and not request.startswith(b"HEAD"):
        assert answer.body.strip()  # a refusal says why


@FUZZ
@given(
    method=st.binary(max_size=10),
    target=st.binary(max_size=120),
    headers=st.lists(st.tuples(st.binary(max_size=24), st.binary(max_size=60)), max_size=8),
)
def test_the_router_decides_on_anything(method: bytes, target: bytes, headers: list) -> None:
    """The router itself, past h11: any method, target and header bytes at all."""
    for origins in (frozenset(), frozenset({"https://ok.example"})):
        decision = route_request(method, target, headers, allowed_origins=origins, page=b"<p>")
        assert isinstance(decision, (HttpResponse, Upgrade))
        if isinstance(decision, HttpResponse):
            assert decision.status in {200, 400, 403, 404, 405, 426}


# -- with an authenticator ----------------------------------------------------------------------
#
# Requests carrying tokens (in the Authorization header, as a bearer.<token> subprotocol, in
# the query string), some correctly signed, most not: wrong key, wrong or no algorithm,
# expired, not yet valid, for another audience, a bad sub or rooms claim. The router and the
# hub answer every one, and an upgrade happens only for a good token, as its sub.

AUTH_NOW = 1_700_000_000
AUTH_SECRET = b"fuzz-secret-for-tests-0123456789abcdef"
WRONG_SECRET = b"not-the-fuzz-secret-0123456789abcdef!!"
LEEWAY = 30
AUTH = JWTAuthenticator(secret=AUTH_SECRET, leeway=LEEWAY)

#: What route_request answers (200: /healthz), and what a hub adds: 429 and 503 for its
#: connection limits, 431 for an oversized request, and h11's 501/505 for requests it
#: cannot frame.
ROUTER_STATUSES = {200, 400, 401, 403, 404, 405, 426}
HUB_STATUSES = {101, 431, 429, 503, 501, 505} | ROUTER_STATUSES

_MISSING = object()
_SIGNERS = {"HS256": hashlib.sha256, "HS384": hashlib.sha384}


@attrs.frozen
class TokenSpec:
    """How one token was made, and so whether it should be accepted."""

    key: bytes
    alg: str
    claims: dict[str, Any]

    @property
    def token(self) -> str:
        header = _b64(json.dumps({"alg": self.alg, "typ": "JWT"}).encode())
        payload = _b64(json.dumps(self.claims).encode())  # NaN/Infinity too, as PyJWT reads them
        signing_input = f"{header}.{payload}"
        if self.alg == "none":
            return signing_input + "."
        mac = hmac.new(self.key, signing_input.encode(), _SIGNERS[self.alg])
        return f"{signing_input}.{_b64(mac.digest())}"

    @property
    def good(self) -> bool:
        """Correctly signed, unexpired, already valid, for no audience, with a usable sub."""
        claims = self.claims
        if self.key != AUTH_SECRET or self.alg != "HS256":
            return False
        exp = _seconds(claims.get("exp", _MISSING))
        if exp is None or exp + LEEWAY < AUTH_NOW:
            return False
        if "nbf" in claims:
            nbf = _seconds(claims["nbf"])
            if nbf is None or nbf - LEEWAY > AUTH_NOW:
                return False
        sub = claims.get("sub")
        return (
            "aud" not in claims
            and isinstance(sub, str)
            and 1 <= len(sub) <= 64
            and not any(unicodedata.category(c) in ("Cc", "Cf", "Cs") for c in sub)
            and _depth(claims) <= MAX_CLAIMS_DEPTH
        )

    @property
    def rooms_ok(self) -> bool:
        """The rooms claim (if any) has a shape the authenticator takes."""
        return self.claims.get("rooms", _MISSING) in ROOMS_OK_SHAPE

    @property
    def may_join_lobby(self) -> bool:
        return self.claims.get("rooms", _MISSING) in ROOMS_GRANTING_LOBBY


def _depth(value: object) -> int:
    """How deeply arrays and objects nest in a JSON value (a scalar is 0)."""
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


def _nested_list(depth: int) -> object:
    value: object = []
    for _ in range(depth - 1):
        value = [value]
    return value


#: A claim nested around the limit (the claims object adds one level) and far past it
#: (hundreds of levels once made the handshake fail with RecursionError).
DEEP_CLAIMS = [_nested_list(n) for n in (1, MAX_CLAIMS_DEPTH - 1, MAX_CLAIMS_DEPTH, 600)]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _seconds(value: object) -> float | None:
    """A NumericDate as RFC 7519 means it: a finite JSON number (a bool is none)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        seconds = float(value)
    except OverflowError:
        return None
    return seconds if math.isfinite(seconds) else None


#: Rooms claims, by what they allow. Identity matters for the missing claim, so lists.
ROOMS_GRANTING_LOBBY = [
    _MISSING,
    ["*"],
    ["lobby"],
    ["lob?y", "x"],
    ["l*y"],
    {"join": ["*"]},
    {"join": ["lobby"], "publish": [], "presence": ["*"]},
]
ROOMS_OK_SHAPE = [*ROOMS_GRANTING_LOBBY, ["other"], [], {"join": [], "publish": ["*"]}]
ROOMS_BAD_SHAPE = [
    "everything",
    None,
    42,
    {"publsh": ["*"]},
    [1],
    {"join": "lobby"},
    [""],
    ["lobby", "x\ud800"],  # a lone surrogate: not UTF-8 text
    {"join": ["\udfff*"]},
]

#: Every claim value above but "no claim", for drawing.
ROOMS_CLAIMS = [r for r in ROOMS_OK_SHAPE + ROOMS_BAD_SHAPE if r is not _MISSING]

#: Valid usernames: 1-64 characters, none of them a control character (category Cc is
#: exactly C0, DEL and C1) nor a lone surrogate (not encodable in a JWT's JSON).
usernames = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Cf")), min_size=1, max_size=64)
near_now = st.integers(-7200, 7200) | st.sampled_from([-LEEWAY - 1, -LEEWAY, -LEEWAY + 1])
numeric_dates = st.one_of(
    near_now.map(lambda d: AUTH_NOW + d),
    near_now.map(lambda d: AUTH_NOW + d + 0.5),
    st.sampled_from(
        [10**30, 10**400, -(10**400), math.inf, -math.inf, math.nan, True, "soon", None, [1]]
    ),
)
token_specs = st.builds(
    TokenSpec,
    key=st.sampled_from([AUTH_SECRET, AUTH_SECRET, WRONG_SECRET]),
    alg=st.sampled_from(["HS256", "HS256", "HS256", "HS384", "none"]),
    claims=st.fixed_dictionaries(
        {},
        optional={
            "sub": usernames
            | st.sampled_from(["", "x" * 65, "a\nb", "\x85", 7, None, ["ann"]])
            # Lone surrogates (valid JSON as "\ud800", no UTF-8 form) and format
            # characters (a name displayed as another) are refused.
            | st.sampled_from(
                ["x\ud800", "\udfff", "a\udc00b", "evil\u202enimda", "\u200b", "\ufeff"]
            ),
            "deep": st.sampled_from(DEEP_CLAIMS),
            "exp": numeric_dates,
            "nbf": numeric_dates,
            "aud": st.sampled_from(["roombus", ["roombus"]]),
            "rooms": st.sampled_from(ROOMS_CLAIMS),
            "iss": st.just("someone"),  # no issuer is configured: ignored
        },
    ),
)
#: Tokens with the right shape, most of them good and the rest wrong in one or two ways
#: (another key, another algorithm or none, an audience, a time just outside the
#: leeway), so that acceptance is exercised as much as refusal, and near misses more
#: than garbage.
plausible_specs = st.builds(
    TokenSpec,
    key=st.sampled_from([AUTH_SECRET] * 4 + [WRONG_SECRET]),
    alg=st.sampled_from(["HS256"] * 4 + ["HS384", "none"]),
    claims=st.fixed_dictionaries(
        {"sub": usernames, "exp": near_now.map(lambda d: AUTH_NOW + d)},
        optional={
            "nbf": near_now.map(lambda d: AUTH_NOW + d),
            "rooms": st.sampled_from(ROOMS_CLAIMS),
            "aud": st.just("roombus"),
        },
    ),
)
any_specs = plausible_specs | token_specs


def _query_value(text: str) -> bytes:
    # A lone surrogate goes as its would-be UTF-8 bytes (%ED%A0%80), which are not UTF-8.
    return quote(text, safe="", errors="surrogatepass").encode()


@st.composite
def auth_requests(
    draw: st.DrawFn,
) -> tuple[bytes, bytes, list[tuple[bytes, bytes]], list[TokenSpec]]:
    """A method, target and headers (names in lower case) carrying tokens; and how the
    tokens were made."""
    specs = draw(st.lists(any_specs, max_size=3))
    tokens = [s.token for s in specs]
    junk = st.text(st.sampled_from("abcXYZ019-_."), max_size=40)
    token_text = st.sampled_from(tokens) if tokens else junk
    some_token = token_text | junk
    with_noise = st.tuples(some_token, st.sampled_from(["", "", "", "", " ", "x", "\t", "."])).map(
        lambda t: t[0] + t[1]
    )

    # Mostly plausible upgrades, so that most requests reach the authenticator; now and
    # then anything at all.
    wild = st.sampled_from([False] * 7 + [True])
    method = draw(
        st.binary(max_size=8) if draw(wild) else st.sampled_from([b"GET"] * 6 + [b"HEAD", b"POST"])
    )
    params = draw(
        st.lists(
            st.tuples(
                st.sampled_from(["room", "username", "token", "token", "x"]),
                st.sampled_from(["lobby", "ann", "mallory", ""])
                | some_token
                | st.text(max_size=12)
                | st.sampled_from(["ann\ud800", "\udc00", "evil\u202enimda", "\ufeffann"]),
            ),
            max_size=5,
        )
    )
    query = b"&".join(_query_value(k) + b"=" + _query_value(v) for k, v in params)
    paths = [b"/ws?room=lobby&"] * 4 + [b"/ws?", b"/healthz?", b"/?", b"/other?"]
    target = draw(st.binary(max_size=80)) if draw(wild) else draw(st.sampled_from(paths)) + query

    base = [
        (b"host", b"x"),
        (b"upgrade", b"websocket"),
        (b"connection", b"Upgrade"),
        (b"sec-websocket-version", b"13"),
        (b"sec-websocket-key", KEY),
    ]
    headers = list(base)
    if draw(wild):
        del headers[draw(st.integers(0, len(base) - 1))]
    credential = st.one_of(
        st.tuples(
            st.just(b"authorization"),
            st.tuples(
                st.sampled_from(["Bearer ", "bearer ", "BEARER  ", "Basic ", "Bearer", ""]),
                with_noise,
            ).map(lambda t: (t[0] + t[1]).encode("latin-1")),
        ),
        st.tuples(
            st.just(b"sec-websocket-protocol"),
            st.tuples(
                st.sampled_from(["roombus, bearer.", "bearer.", "roombus,bearer.", "chat, "]),
                with_noise,
            ).map(lambda t: (t[0] + t[1]).encode("latin-1")),
        ),
        st.tuples(st.just(b"sec-websocket-protocol"), st.sampled_from([b"roombus", b"bearer."])),
        st.tuples(
            st.just(b"origin"), st.sampled_from([b"https://ok.example", b"https://evil.example"])
        ),
        st.tuples(st.binary(min_size=1, max_size=20), st.binary(max_size=40)),
    )
    extra = draw(st.lists(credential, max_size=4))
    if tokens and not draw(wild):  # mostly, one token where it belongs among the rest
        token = draw(st.sampled_from(tokens)).encode()
        place = draw(st.sampled_from(["authorization", "subprotocol", "query"]))
        if place == "authorization":
            extra.append((b"authorization", b"Bearer " + token))
        elif place == "subprotocol":
            extra.append((b"sec-websocket-protocol", b"roombus, bearer." + token))
        else:
            target += b"&token=" + token
    headers = draw(st.permutations(headers + extra))
    return method, target, headers, specs


def _good_subs(request_bytes: bytes, specs: list[TokenSpec]) -> set[str]:
    """The subs of the good tokens that appear somewhere in the request."""
    return {s.claims["sub"] for s in specs if s.good and s.token.encode() in request_bytes}


def _everything(target: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    return b"\n".join([target, *(name + b": " + value for name, value in headers)])


@FUZZ
@given(request=auth_requests(), origins=st.booleans())
def test_the_router_with_an_authenticator_upgrades_only_good_tokens(
    request: tuple, origins: bool
) -> None:
    method, target, headers, specs = request
    allowed = frozenset({"https://ok.example"}) if origins else frozenset()
    decision = route_request(
        method,
        target,
        headers,
        allowed_origins=allowed,
        authenticator=AUTH,
        now=AUTH_NOW,
    )
    assert isinstance(decision, (HttpResponse, Upgrade))
    if isinstance(decision, HttpResponse):
        assert decision.status in ROUTER_STATUSES
        if decision.status == 401:
            assert (b"www-authenticate", b"Bearer") in decision.headers
        for spec in specs:  # a refusal never echoes a token
            assert spec.token.encode() not in decision.body
        return
    assert decision.username in _good_subs(_everything(target, headers), specs)
    assert decision.identity is not None and decision.identity.username == decision.username
    assert decision.subprotocol in (None, b"roombus")


def _hub_request(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    lines = [method + b" " + target + b" HTTP/1.1"]
    lines += [name + b": " + value for name, value in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def _drain(hub: Hub, out: dict[int, bytes]) -> None:
    for cid, queue in hub.take_dirty():
        while queue:
            chunk = bytes(queue.data())
            out[cid] = out.get(cid, b"") + chunk
            queue.consume(len(chunk))
        hub.flushed(cid)


def _status(data: bytes) -> tuple[int, bytes] | None:
    """The status and head of the response at the start of *data*; None if nothing."""
    if not data:
        return None
    head, sep, _ = data.partition(b"\r\n\r\n")
    assert sep, data[:200]
    status_line = head.split(b"\r\n", 1)[0]
    assert status_line.startswith(b"HTTP/1.1 "), status_line
    return int(status_line[9:12]), head


@FUZZ
@given(request=auth_requests(), origins=st.booleans())
def test_the_hub_with_an_authenticator_upgrades_only_good_tokens(
    request: tuple, origins: bool
) -> None:
    """
    The same requests as bytes into a hub (limits: 3 connections, 2 per address), on four
    connections opened first: two within the limits, one over the per-address limit (429),
    one over the total (503).
    """
    method, target, headers, specs = request
    allowed = frozenset({"https://ok.example"}) if origins else frozenset()
    hub = Hub(
        BrokerConfig(),
        ServerConfig(max_connections=3, max_connections_per_ip=2, allowed_origins=allowed),
        authenticator=AUTH,
    )
    data = _hub_request(method, target, headers)
    peers = ["10.0.0.1:1001", "10.0.0.1:1002", "10.0.0.1:1003", "10.0.0.2:1001"]
    cids = [hub.open(now=0.0, peer=peer) for peer in peers]
    out: dict[int, bytes] = {}
    for cid in cids:
        hub.receive(cid, data, now=0.0, timestamp=AUTH_NOW)
        _drain(hub, out)
    good_subs = _good_subs(data, specs)
    for i, cid in enumerate(cids):
        answer = _status(out.get(cid, b""))
        if answer is None:  # the request never completed (a header that ends it early)
            continue
        status, _ = answer
        assert status in HUB_STATUSES, status
        for spec in specs:
            assert spec.token.encode() not in out[cid]  # never echoed, not even on a 101
        # Over a limit a request is refused unless unreadable, or a probe (answered
        # within its budget of its own).
        probe = method in (b"GET", b"HEAD") and target.partition(b"?")[0] in (
            b"/healthz",
            b"/metrics",
        )
        if i == 2:
            assert status in {429, 400, 431, 501, 505} or (probe and status == 200)
        elif i == 3:
            assert status in {503, 400, 431, 501, 505} or (probe and status == 200)
        if status == 101:
            (room,) = hub.broker.rooms_of(cid)
            users = hub.broker.members(room)
            assert len(users) == 1 and users[0] in good_subs
    for cid in cids:
        hub.receive(cid, None, now=1.0, timestamp=AUTH_NOW)
        hub.lost(cid, now=1.0, timestamp=AUTH_NOW)
    assert hub.connection_count == 0
    assert hub.broker.statistics().connections == 0


placements = st.sampled_from(["authorization", "subprotocol", "query"])


@FUZZ
@given(spec=any_specs, placement=placements)
def test_one_token_decides_the_upgrade(spec: TokenSpec, placement: str) -> None:
    """
    A well-formed upgrade carrying one token, in any of its three places: the router
    upgrades exactly when the token is good (as its sub, whatever username the query
    names), says 403 for a good token with a malformed rooms claim, else 401; the hub
    also refuses (403) a good token whose rooms claim does not grant the room.
    """
    token = spec.token
    target = b"/ws?room=lobby&username=mallory"
    headers = [
        (b"host", b"x"),
        (b"upgrade", b"websocket"),
        (b"connection", b"Upgrade"),
        (b"sec-websocket-version", b"13"),
        (b"sec-websocket-key", KEY),
    ]
    if placement == "authorization":
        headers.append((b"authorization", b"Bearer " + token.encode()))
    elif placement == "subprotocol":
        headers.append((b"sec-websocket-protocol", b"roombus, bearer." + token.encode()))
    else:
        target += b"&token=" + token.encode()

    decision = route_request(b"GET", target, headers, authenticator=AUTH, now=AUTH_NOW)
    if spec.good and spec.rooms_ok:
        assert isinstance(decision, Upgrade), decision
        assert decision.username == spec.claims["sub"]
        assert decision.room == "lobby"
        assert decision.subprotocol == (b"roombus" if placement == "subprotocol" else None)
    else:
        assert isinstance(decision, HttpResponse)
        assert decision.status == (403 if spec.good else 401), (decision, spec)

    hub = Hub(authenticator=AUTH)
    cid = hub.open(now=0.0, peer="10.0.0.1:1")
    hub.receive(cid, _hub_request(b"GET", target, headers), now=0.0, timestamp=AUTH_NOW)
    out: dict[int, bytes] = {}
    _drain(hub, out)
    answer = _status(out[cid])
    assert answer is not None
    status, head = answer
    admitted = spec.good and spec.rooms_ok and spec.may_join_lobby
    assert status == (101 if admitted else 403 if spec.good else 401), (status, spec)
    if admitted:
        assert hub.broker.members("lobby") == [spec.claims["sub"]]
        has_protocol = b"\r\nsec-websocket-protocol: roombus" in head.lower()
        assert has_protocol == (placement == "subprotocol")
    hub.lost(cid, now=1.0, timestamp=AUTH_NOW)
    assert hub.connection_count == 0
