"""
Authentication and room authorization, as pure functions of a request and the time.

Two questions, asked at different moments, so two plug points:

* :class:`Authenticator` — *who is this?* Asked once per handshake, with the
  request's path, query and headers and the current time; answers with an
  :class:`Identity` or a :class:`Refusal` (an HTTP status and a short reason).
  :class:`JWTAuthenticator` checks bearer tokens with PyJWT; anything else (a
  session cookie, an API key) is a class with an ``authenticate`` method.
* :class:`~roombus.core.auth.Authorizer` — *may this identity do that in this room?*
  Asked by the broker when a connection joins a room, so it is synchronous and pure;
  it lives with the broker in :mod:`roombus.core.auth`.

Nothing here reads a clock or touches a socket: ``now`` is a parameter, which is
what lets the tests pin expiry to the second. PyJWT and cryptography are imported
only when a :class:`JWTAuthenticator` is made, so a server without it needs neither.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Final, Protocol, final
from urllib.parse import parse_qsl

import attrs

from ..core.auth import Authorizer, ClaimsAuthorizer, Identity, RoomRules
from ..core.errors import ConfigError
from ..core.names import Username, is_valid_username
from .typing import Headers

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

#: The subprotocol a server answers when a browser carried its token as
#: ``bearer.<token>`` in ``Sec-WebSocket-Protocol``: it must echo one the client
#: offered, and echoing the token would publish it in the response.
SUBPROTOCOL: Final = b"roombus"
#: The prefix of an offered subprotocol that carries a bearer token.
BEARER_SUBPROTOCOL_PREFIX: Final = b"bearer."

#: Longest token looked at. A token is decoded and its signature checked before
#: anything else, so an unbounded one would be unbounded work per handshake.
MAX_TOKEN_LENGTH: Final = 16 * 1024
#: Deepest nesting of arrays and objects in a token's header or claims (the claims
#: object itself is one level; a ``rooms`` object claim is three). Checked before
#: PyJWT decodes anything: decoding and copying a deeper value recurses once per
#: level, and hundreds of levels exhaust the interpreter's stack.
MAX_CLAIMS_DEPTH: Final = 32
#: Shortest HMAC secret: RFC 7518 3.2 wants a key at least as long as the hash.
MIN_SECRET_BYTES: Final = 32
#: Smallest RSA key, in bits (NIST SP 800-131A; PyJWT warns below it).
MIN_RSA_BITS: Final = 2048

_NO_SUBPROTOCOL_REASON: Final = "offer the 'roombus' subprotocol alongside bearer.<token>"


@attrs.frozen
class Refusal:
    """
    Why a handshake is refused, as the HTTP response should say it.

    Attributes:
        status: 401 for missing, invalid or expired credentials (try again with
            better ones), 403 for valid credentials that do not allow this, 400 for
            a request that cannot be answered at all (see :func:`selected_subprotocol`).
        reason: A short text for the response body and the log. It never contains
            the credentials, so it is safe to show and to log.
    """

    status: int
    reason: str


class Authenticator(Protocol):
    """
    Decides who a handshaking client is.

    Implement this to plug in any scheme (a session cookie, an API key, mTLS
    details a proxy put in a header). An implementation must not raise because of
    what the client sent: bad or missing credentials are a :class:`Refusal`.
    """

    def authenticate(
        self, *, path: bytes, query: bytes, headers: Headers, now: float
    ) -> Identity | Refusal:
        """
        Authenticate one handshake.

        Args:
            path: The request path, e.g. ``b"/ws"``.
            query: The query string, without the ``?``.
            headers: The headers, names in lower case.
            now: The current time in unix seconds (wall clock, as ``exp`` is).
        """
        ...


def authorizer_for(
    authorizer: Authorizer | None, authenticator: Authenticator | None
) -> Authorizer | None:
    """
    The authorizer a server's broker uses: *authorizer*; with an *authenticator* and
    no authorizer, the identity's room rules (a token's ``rooms`` claim) decide.
    """
    if authorizer is None and authenticator is not None:
        return ClaimsAuthorizer()
    return authorizer


# --- Finding the token -----------------------------------------------------------------


def _offered_subprotocols(headers: Headers) -> list[bytes]:
    offered: list[bytes] = []
    for name, value in headers:
        if name == b"sec-websocket-protocol":
            offered.extend(p.strip() for p in value.split(b","))
    return [p for p in offered if p]


def _authorization_token(headers: Headers) -> str | None:
    for name, value in headers:
        if name == b"authorization":
            scheme, _, credentials = value.strip().partition(b" ")
            token = credentials.strip()
            if scheme.lower() == b"bearer" and token:
                return token.decode("latin-1")
    return None


def _subprotocol_token(offered: Iterable[bytes]) -> str | None:
    for protocol in offered:
        if protocol.startswith(BEARER_SUBPROTOCOL_PREFIX):
            token = protocol[len(BEARER_SUBPROTOCOL_PREFIX) :]
            if token:
                return token.decode("latin-1")
    return None


def _query_token(query: bytes) -> str | None:
    try:
        params = parse_qsl(query.decode("ascii"), keep_blank_values=True, errors="strict")
    except UnicodeError:
        return None
    for name, value in params:
        if name == "token":  # the first of repeated parameters wins, as for room
            return value or None
    return None


def token_from_request(path: bytes, query: bytes, headers: Headers) -> str | None:
    """
    The bearer token a request carries, or None.

    The sources, in order, and the first that has one wins (a bad token there is
    not rescued by a good one further down):

    1. ``Authorization: Bearer <token>``, for clients that can set headers;
    2. ``Sec-WebSocket-Protocol: roombus, bearer.<token>``, for browsers, whose
       WebSocket API cannot set headers but can offer subprotocols;
    3. ``?token=<token>``, last because query strings end up in access logs.

    *path* is unused: it is there so the arguments are those of
    :meth:`Authenticator.authenticate`.
    """
    del path
    return (
        _authorization_token(headers)
        or _subprotocol_token(_offered_subprotocols(headers))
        or _query_token(query)
    )


def selected_subprotocol(headers: Headers) -> bytes | None:
    """
    The subprotocol the handshake response should name: :data:`SUBPROTOCOL` if the
    client offered it, else None (no ``Sec-WebSocket-Protocol`` in the response).

    Browsers fail a handshake that offered subprotocols and got none back, and the
    answer must be one of those offered; a client carrying ``bearer.<token>``
    therefore offers ``roombus`` too, and the server answers that, never the token.
    :class:`JWTAuthenticator` refuses (400) a request that offers a bearer token
    without ``roombus``, so after it accepted, this is never None for such a client.
    """
    return SUBPROTOCOL if SUBPROTOCOL in _offered_subprotocols(headers) else None


# --- JWT -------------------------------------------------------------------------------


# A JSON string (escapes included) or an unterminated one, so that brackets inside
# strings are not counted as nesting.
_JSON_STRING: Final = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
_NOT_BRACKETS: Final = bytes(b for b in range(256) if b not in b"[]{}")


def _nesting(segment: str) -> int:
    """
    How deeply arrays and objects nest in a token segment's JSON (0 if it does not
    decode, which PyJWT then refuses). A linear scan with no recursion: strings are
    cut out, then brackets counted.
    """
    try:
        data = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (ValueError, binascii.Error):
        return 0
    depth = deepest = 0
    for byte in _JSON_STRING.sub(b"", data).translate(None, _NOT_BRACKETS):
        if byte in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def _too_deep(token: str) -> bool:
    """Whether the header or claims of *token* nest deeper than :data:`MAX_CLAIMS_DEPTH`."""
    return any(_nesting(segment) > MAX_CLAIMS_DEPTH for segment in token.split(".", 2)[:2])


def _numeric_date(value: object) -> float | None:
    """A NumericDate claim (``exp``, ``nbf``) as seconds, or None if it is not a finite number."""
    if type(value) is int:
        try:
            return float(value)
        except OverflowError:
            return None
    if type(value) is float and math.isfinite(value):
        return value
    return None


def _load_public_key(pem: str | bytes) -> tuple[RSAPublicKey | EllipticCurvePublicKey, str]:
    """The key and the one algorithm it verifies, or ConfigError."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric.ec import (
        SECP256R1,
        EllipticCurvePublicKey,
    )
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    data = pem.encode() if isinstance(pem, str) else pem
    try:
        key = load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigError(
            "jwt-public-key", "not a PEM public key (-----BEGIN PUBLIC KEY-----)"
        ) from None
    if isinstance(key, RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise ConfigError(
                "jwt-public-key",
                f"the RSA key has {key.key_size} bits; at least {MIN_RSA_BITS} are needed",
            )
        return key, "RS256"
    if isinstance(key, EllipticCurvePublicKey) and isinstance(key.curve, SECP256R1):
        return key, "ES256"
    raise ConfigError("jwt-public-key", "must be an RSA or P-256 (ES256) public key")


def _check_secret(secret: str | bytes) -> bytes:
    from jwt.algorithms import HMACAlgorithm
    from jwt.exceptions import InvalidKeyError

    if not isinstance(secret, (str, bytes)):
        raise ConfigError("jwt-secret", f"must be a string or bytes, not {type(secret).__name__}")
    data = secret.encode() if isinstance(secret, str) else secret
    if len(data) < MIN_SECRET_BYTES:
        raise ConfigError(
            "jwt-secret", f"must be at least {MIN_SECRET_BYTES} bytes, not {len(data)}"
        )
    try:
        HMACAlgorithm(HMACAlgorithm.SHA256).prepare_key(data)
    except InvalidKeyError:
        raise ConfigError("jwt-secret", "looks like a PEM or SSH key, not an HMAC secret") from None
    return data


def _check_name(setting: str, value: object, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not (isinstance(value, str) and value):
        raise ConfigError(setting, f"must be a non-empty string, not {value!r}")


@final
class JWTAuthenticator:
    """
    Authenticates a handshake by a signed JSON Web Token (RFC 7519), with PyJWT.

    The token comes from the request as :func:`token_from_request` finds it. Its
    signature must verify with the one configured key, and its ``exp``, ``nbf``,
    ``aud`` and ``iss`` must hold; then the username comes from ``sub`` and the
    room rules from ``rooms`` (see :meth:`RoomRules.from_claim`; no claim means no
    restrictions).

    Exactly one key is configured, and it fixes the one algorithm accepted:
    a *secret* means HS256; a *public_key* means RS256 (RSA) or ES256 (P-256).
    The token's own ``alg`` header is never trusted to choose, so ``alg: none``
    and HS256 tokens "signed" with the public key are refused.

    Time claims are checked against the *now* passed in, not the clock (PyJWT's own
    checks read the clock, so they are off): a token is accepted while
    ``now <= exp + leeway`` and once ``now >= nbf - leeway``.

    Args:
        secret: The HMAC secret (HS256), at least 32 bytes (RFC 7518 3.2). A shorter
            one is a :class:`ConfigError` rather than PyJWT's per-token warning: a
            short HMAC key can be brute-forced from any token, so it is a
            misconfiguration, and a warning per handshake would flood the log.
        public_key: A PEM public key (RS256 with RSA of 2048 bits or more, or ES256).
        leeway: Seconds of clock skew tolerated on ``exp`` and ``nbf``.
        audience: If set, ``aud`` must be it or a list holding it. If not, a token with
            ``aud`` is refused, as RFC 7519 4.1.3 requires: a token for another
            service must not work here.
        issuer: If set, ``iss`` must be it.
        require_exp: Refuse tokens without ``exp`` (that would never expire).
        username_claim: The claim holding the username.
        rooms_claim: The claim holding the room rules.

    Raises:
        ConfigError: No key, both keys, a bad key, or a bad option. Also when
            PyJWT or cryptography is not installed.
    """

    __slots__ = (
        "_algorithms",
        "_key",
        "audience",
        "issuer",
        "leeway",
        "require_exp",
        "rooms_claim",
        "username_claim",
    )

    def __init__(
        self,
        *,
        secret: str | bytes | None = None,
        public_key: str | bytes | None = None,
        leeway: float = 30.0,
        audience: str | None = None,
        issuer: str | None = None,
        require_exp: bool = True,
        username_claim: str = "sub",
        rooms_claim: str = "rooms",
    ) -> None:
        if (secret is None) == (public_key is None):
            raise ConfigError("jwt-secret", "give exactly one of a secret and a public key")
        setting = "jwt-secret" if public_key is None else "jwt-public-key"
        try:
            import cryptography  # noqa: F401
            import jwt  # noqa: F401
        except ImportError:
            raise ConfigError(
                setting, "JWT authentication needs PyJWT with cryptography (PyJWT[crypto])"
            ) from None
        if not (
            isinstance(leeway, (int, float))
            and not isinstance(leeway, bool)
            and math.isfinite(leeway)
            and leeway >= 0
        ):
            raise ConfigError("jwt-leeway", f"must be a non-negative number, not {leeway!r}")
        _check_name("jwt-audience", audience, optional=True)
        _check_name("jwt-issuer", issuer, optional=True)
        _check_name("jwt-username-claim", username_claim)
        _check_name("jwt-rooms-claim", rooms_claim)

        key: bytes | RSAPublicKey | EllipticCurvePublicKey
        if secret is not None:
            key, algorithm = _check_secret(secret), "HS256"
        else:
            assert public_key is not None
            key, algorithm = _load_public_key(public_key)
        self._key: Final = key
        self._algorithms: Final = (algorithm,)
        self.leeway: Final = float(leeway)
        self.audience: Final = audience
        self.issuer: Final = issuer
        self.require_exp: Final = require_exp
        self.username_claim: Final = username_claim
        self.rooms_claim: Final = rooms_claim

    def __repr__(self) -> str:  # never the key
        return (
            f"JWTAuthenticator(algorithm={self._algorithms[0]!r}, leeway={self.leeway!r}, "
            f"audience={self.audience!r}, issuer={self.issuer!r})"
        )

    @property
    def algorithm(self) -> str:
        """The one signature algorithm accepted: ``HS256``, ``RS256`` or ``ES256``."""
        return self._algorithms[0]

    def authenticate(
        self, *, path: bytes, query: bytes, headers: Headers, now: float
    ) -> Identity | Refusal:
        """
        Check the request's token; see the class docstring for what is checked.

        The refusals: 400 for a ``bearer.<token>`` subprotocol offered without
        ``roombus`` (the handshake could not be answered, see
        :func:`selected_subprotocol`); 401 ``missing token``, ``token too long``,
        ``invalid token`` (malformed, bad signature, wrong algorithm or key),
        ``token expired``, ``token not yet valid``, ``token has no expiry``,
        ``invalid audience``, ``invalid issuer``, ``invalid sub claim``;
        403 ``invalid rooms claim``.
        """
        offered = _offered_subprotocols(headers)
        if SUBPROTOCOL not in offered and any(
            p.startswith(BEARER_SUBPROTOCOL_PREFIX) for p in offered
        ):
            return Refusal(400, _NO_SUBPROTOCOL_REASON)
        token = token_from_request(path, query, headers)
        if token is None:
            return Refusal(401, "missing token")
        if len(token) > MAX_TOKEN_LENGTH:
            return Refusal(401, "token too long")
        if _too_deep(token):
            return Refusal(401, "invalid token")
        claims = self._decode(token)
        if claims is None:
            return Refusal(401, "invalid token")
        return self._check_claims(claims, now)

    def _decode(self, token: str) -> dict[str, Any] | None:
        """The token's claims if its signature verifies, else None."""
        import jwt

        try:
            return jwt.decode(
                token,
                self._key,
                algorithms=list(self._algorithms),
                options={
                    "verify_signature": True,
                    # Checked in _check_claims, against `now` rather than the clock.
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "verify_aud": False,
                    "verify_iss": False,
                    "verify_sub": False,
                    "verify_jti": False,
                    "require": [],
                    "enforce_minimum_key_length": True,
                },
            )
        except (jwt.PyJWTError, RecursionError):  # older PyJWT lets RecursionError out
            return None

    def _check_claims(self, claims: Mapping[str, Any], now: float) -> Identity | Refusal:
        exp: float | None = None
        if "exp" in claims:
            exp = _numeric_date(claims["exp"])
            if exp is None:
                return Refusal(401, "invalid token")
            if not now <= exp + self.leeway:
                return Refusal(401, "token expired")
        elif self.require_exp:
            return Refusal(401, "token has no expiry")
        if "nbf" in claims:
            nbf = _numeric_date(claims["nbf"])
            if nbf is None:
                return Refusal(401, "invalid token")
            if now < nbf - self.leeway:
                return Refusal(401, "token not yet valid")
        if not self._audience_ok(claims):
            return Refusal(401, "invalid audience")
        if self.issuer is not None and claims.get("iss") != self.issuer:
            return Refusal(401, "invalid issuer")

        username = claims.get(self.username_claim)
        if not is_valid_username(username):
            return Refusal(401, f"invalid {self.username_claim} claim")
        rooms: RoomRules | None = None
        if self.rooms_claim in claims:
            try:
                rooms = RoomRules.from_claim(claims[self.rooms_claim])
            except ValueError:
                return Refusal(403, f"invalid {self.rooms_claim} claim")
        return Identity(
            username=Username(username),  # type: ignore[arg-type]  # checked above
            expires_at=exp,
            rooms=rooms,
            claims=claims,
        )

    def _audience_ok(self, claims: Mapping[str, Any]) -> bool:
        if "aud" not in claims:
            return self.audience is None
        if self.audience is None:
            return False
        aud = claims["aud"]
        if isinstance(aud, list):
            return self.audience in aud
        return bool(aud == self.audience)
