"""
Credentials out of log text: :func:`redact`. Sans-IO, pure.

roombus never puts a token, a query string or a header in its own log lines; this is
the second line of defence, for text that comes from elsewhere (a custom
authenticator's refusal reason, another program's log record through
:class:`roombus.logging.RedactTokens`). What it rewrites, case-insensitively:

* ``token=VALUE`` (also ``access_token=``, ``id_token=``...), as in a URL's query:
  the value up to ``&``, ``#``, ``;``, ``,``, whitespace or a quote;
* ``Bearer VALUE`` and ``apikey VALUE``: an ``Authorization`` header's credentials;
* ``bearer.VALUE``: a token carried as a WebSocket subprotocol;
* ``Authorization: VALUE``: a whole header's value, whatever its scheme.

Each value becomes :data:`REDACTED`; the rest of the text is kept.
"""

from __future__ import annotations

import re
from typing import Final

#: What a credential is replaced with.
REDACTED: Final = "[redacted]"

# The end of a value: whitespace, a quote, or what separates query parameters and
# header list items.
_VALUE: Final = r"[^\s\"'&#;,]+"

_PATTERN: Final = re.compile(
    rf"(?P<query>token=)(?P<v1>{_VALUE})"
    rf"|(?P<header>\bauthorization\s*[:=]\s*)(?P<v2>(?:\w+\s+)?{_VALUE})"
    rf"|(?P<scheme>\b(?:bearer|apikey)\s+)(?P<v3>{_VALUE})"
    rf"|(?P<subprotocol>\bbearer\.)(?P<v4>{_VALUE})",
    re.IGNORECASE,
)

# Cheap first look: none of these, nothing to redact (most log lines).
_HINTS: Final = ("token=", "bearer", "apikey", "authorization")


def _replace(match: re.Match[str]) -> str:
    prefix = match.group("query") or match.group("header") or match.group("scheme")
    return (prefix or match.group("subprotocol")) + REDACTED


def redact(text: str) -> str:
    """*text* with every credential it shows replaced by :data:`REDACTED`."""
    lowered = text.lower()
    if not any(hint in lowered for hint in _HINTS):
        return text
    return _PATTERN.sub(_replace, text)


__all__ = ["REDACTED", "redact"]
