"""Close codes have one home (``roombus.core.codes``), named as wsproto names them."""

from __future__ import annotations

from wsproto.frame_protocol import CloseReason

from roombus.core import broker as _broker
from roombus.core.codes import CloseCode
from roombus.lowlevel import PING_TIMEOUT_CODE
from roombus.server import wire as _wire


def test_every_code_is_wsprotos_of_the_same_name() -> None:
    for code in CloseCode:
        assert CloseReason[code.name] == code


def test_the_old_names_are_the_same_codes() -> None:
    assert (
        _wire.NORMAL,
        _wire.GOING_AWAY,
        _wire.PROTOCOL_ERROR,
        _wire.UNSUPPORTED_DATA,
        _wire.INVALID_DATA,
        _wire.POLICY_VIOLATION,
        _wire.MESSAGE_TOO_BIG,
        _broker.POLICY_VIOLATION,
        PING_TIMEOUT_CODE,
    ) == (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1008, 1011)


def test_a_code_prints_as_its_number() -> None:
    """Logs and close reasons written with %d or f-strings show the number."""
    assert f"{CloseCode.POLICY_VIOLATION}" == "1008"
    assert str(CloseCode.INTERNAL_ERROR) == "1011"
    assert _wire.close_frame(CloseCode.GOING_AWAY, "bye")[2:4] == b"\x03\xe9"
