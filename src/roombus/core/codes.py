"""
The WebSocket close codes roombus sends (RFC 6455, section 7.4.1), in one place.

The names are wsproto's (:class:`wsproto.frame_protocol.CloseReason`), so the two can
be compared name for name; this module stays free of wsproto, as the core is.
"""

from __future__ import annotations

import enum


class CloseCode(enum.IntEnum):
    """A close code; an ``int`` wherever one is expected."""

    #: The peer closed, and roombus answers.
    NORMAL_CLOSURE = 1000
    #: The server shuts down (or drains).
    GOING_AWAY = 1001
    #: A frame that breaks RFC 6455 (unmasked, bad opcode, bad length).
    PROTOCOL_ERROR = 1002
    #: A binary frame: roombus speaks text (JSON) only.
    UNSUPPORTED_DATA = 1003
    #: A text message that is not valid UTF-8.
    INVALID_FRAME_PAYLOAD_DATA = 1007
    #: A policy broken: sustained flooding, expired credentials, a slow consumer, a
    #: refused room after the upgrade.
    POLICY_VIOLATION = 1008
    #: A message over ``max_message_bytes`` (or with too many fragments).
    MESSAGE_TOO_BIG = 1009
    #: A peer that stopped answering pings (as websockets uses it).
    INTERNAL_ERROR = 1011
