"""
The log's helpers: ``--log-format`` (flag, variable, file), :class:`JsonFormatter`
(one JSON object per line, whatever a record carries), :class:`RedactTokens` (on
plain messages and on uvicorn's access records), and the structured fields of the
hub's connection events.
"""

from __future__ import annotations

import io
import json
import logging
import re
import sys
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from roombus import ConfigError, Settings
from roombus._cli import _parser
from roombus.logging import FIELDS, REDACTED, JsonFormatter, RedactTokens, _handler, redact
from roombus.node.options import build_configs, settings_from

TS_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
TOKEN = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbm4ifQ.c2lnbmF0dXJlLW9mLWEtdG9rZW4"


def record(
    msg: object = "hello %s",
    args: Any = ("world",),
    *,
    level: int = logging.INFO,
    name: str = "roombus",
    exc_info: Any = None,
    **extra: object,
) -> logging.LogRecord:
    rec = logging.LogRecord(name, level, __file__, 1, msg, args, exc_info)
    rec.__dict__.update(extra)
    return rec


# -- --log-format -------------------------------------------------------------------------------


def cli_settings(tmp_path, *args: str, toml: str = "", env: dict[str, str] | None = None):
    path = tmp_path / "roombus.toml"
    path.write_text(toml)
    return build_configs(_parser().parse_args(["serve", "--config", str(path), *args]), env or {})


def test_the_log_format_from_flag_variable_and_file(tmp_path):
    assert cli_settings(tmp_path).log_format == "text"
    assert cli_settings(tmp_path, toml='log-format = "json"\n').log_format == "json"
    env = {"ROOMBUS_LOG_FORMAT": "JSON"}
    assert cli_settings(tmp_path, env=env).log_format == "json"
    flagged = cli_settings(tmp_path, "--log-format", "text", toml='log-format = "json"\n', env=env)
    assert flagged.log_format == "text"  # the flag wins over the variable and the file
    assert Settings().log_format == "text"


@pytest.mark.parametrize(
    ("flags", "env", "where"),
    [
        ({"log_format": "yaml"}, {}, "--log-format"),
        ({}, {"ROOMBUS_LOG_FORMAT": "logfmt"}, "ROOMBUS_LOG_FORMAT"),
    ],
)
def test_a_bad_log_format_is_one_line_naming_where(flags, env, where):
    with pytest.raises(ConfigError) as info:
        settings_from(flags, env)
    message = str(info.value)
    assert message.startswith(f"{where}: ")
    assert "must be one of text, json" in message
    assert "\n" not in message


def test_a_bad_log_format_in_the_file_names_the_key(tmp_path):
    with pytest.raises(
        ConfigError, match=r"roombus\.toml: log-format: .*must be one of text, json"
    ):
        cli_settings(tmp_path, toml="log-format = 3.5\n")


def test_a_bad_log_format_field_is_a_config_error():
    with pytest.raises(ConfigError, match=r"^log-format: must be one of text, json, not 'xml'"):
        Settings(log_format="xml")


# -- JsonFormatter ------------------------------------------------------------------------------


def test_a_record_is_one_json_object_with_the_base_fields():
    rec = record("conn %d (%s) closed", (7, "1.2.3.4:5"), level=logging.WARNING)
    rec.created = 1_700_000_000.123456
    line = JsonFormatter().format(rec)
    assert "\n" not in line
    out = json.loads(line)
    assert out == {
        "ts": "2023-11-14T22:13:20.123Z",
        "level": "WARNING",
        "logger": "roombus",
        "msg": "conn 7 (1.2.3.4:5) closed",
    }


def test_the_connection_fields_are_written_when_present_and_none_is_left_out():
    rec = record(
        conn=3, peer="1.2.3.4:5", user="ann", room="lobby", code=1008, reason="slow", status=None
    )
    rec.extra_thing = "not a field"
    out = json.loads(JsonFormatter().format(rec))
    assert TS_RE.match(out["ts"])
    assert {k: out[k] for k in ("conn", "peer", "user", "room", "code", "reason")} == {
        "conn": 3,
        "peer": "1.2.3.4:5",
        "user": "ann",
        "room": "lobby",
        "code": 1008,
        "reason": "slow",
    }
    assert "status" not in out
    assert "extra_thing" not in out
    assert list(out)[:4] == ["ts", "level", "logger", "msg"]


def test_an_exception_is_in_exc():
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        rec = record("failed", (), level=logging.ERROR, exc_info=sys.exc_info())
    out = json.loads(JsonFormatter().format(rec))
    assert out["msg"] == "failed"
    assert out["exc"].startswith("Traceback")
    assert "RuntimeError: boom" in out["exc"]


class _Unrepresentable:
    def __repr__(self) -> str:
        raise ValueError("no repr either")


class _Circular(list[object]):
    pass


def test_odd_values_never_raise():
    circular = _Circular()
    circular.append(circular)
    odd = [
        float("nan"),
        float("inf"),
        b"\xff bytes",
        {1: "int key"},
        {(1, 2): "tuple key"},
        circular,
        object(),
        _Unrepresentable(),
        "lone \udcff surrogate",
        10**5000,
        {"nested": [set()]},
    ]
    formatter = JsonFormatter()
    for value in odd:
        line = formatter.format(record(conn=value, room=value, user=value))
        assert line.isascii()
        out = json.loads(line)
        assert {"conn", "room", "user"} <= set(out)


def test_a_message_that_does_not_fit_its_arguments_still_formats():
    out = json.loads(JsonFormatter().format(record("%d and %d", ("one",))))
    assert "%d and %d" in out["msg"]
    assert "one" in out["msg"]


_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text()
    | st.binary()
    | st.builds(object)
    | st.complex_numbers(),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text() | st.integers(), inner, max_size=4)
        | st.tuples(inner, inner)
        | st.frozensets(st.integers(), max_size=3)
    ),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(
    values=st.dictionaries(st.sampled_from(FIELDS), _VALUES),
    msg=st.text(),
    args=st.lists(_VALUES, max_size=3).map(tuple),
)
def test_any_extra_values_make_one_line_of_json(values, msg, args):
    rec = record(msg, args, **values)
    line = JsonFormatter().format(rec)
    assert "\n" not in line
    out = json.loads(line)
    assert set(out) >= {"ts", "level", "logger", "msg"}
    for name, value in values.items():
        assert (name in out) == (value is not None)


def test_the_cli_handler_writes_json_and_redacts():
    stream = io.StringIO()
    handler = _handler("json", stream)
    logger = logging.getLogger("roombus.tests.handler")
    logger.propagate = False
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        logger.info("GET %s", f"/ws?token={TOKEN}", extra={"conn": 1})
    finally:
        logger.removeHandler(handler)
    out = json.loads(stream.getvalue())
    assert out["conn"] == 1
    assert out["msg"] == f"GET /ws?token={REDACTED}"
    assert TOKEN not in stream.getvalue()


def test_the_text_handler_keeps_the_text_format():
    stream = io.StringIO()
    _handler("text", stream).handle(record("joined %r", ("lobby",), conn=2))
    assert re.match(
        r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO roombus: joined 'lobby'\n$", stream.getvalue()
    )


# -- redaction ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"/ws?room=lobby&token={TOKEN}", f"/ws?room=lobby&token={REDACTED}"),
        (f"/ws?token={TOKEN}&room=lobby", f"/ws?token={REDACTED}&room=lobby"),
        (f"/cb?access_token={TOKEN}#x", f"/cb?access_token={REDACTED}#x"),
        (f"Authorization: Bearer {TOKEN}", f"Authorization: {REDACTED}"),
        (f"bearer {TOKEN}", f"bearer {REDACTED}"),
        (f"sent Bearer {TOKEN}, then", f"sent Bearer {REDACTED}, then"),
        ("apikey s3cr3t-key-0123456789abcdef", f"apikey {REDACTED}"),
        ("authorization=apikey abcdef0123456789", f"authorization={REDACTED}"),
        (
            f"Sec-WebSocket-Protocol: roombus, bearer.{TOKEN}",
            f"Sec-WebSocket-Protocol: roombus, bearer.{REDACTED}",
        ),
        (f"[b'roombus', b'bearer.{TOKEN}']", f"[b'roombus', b'bearer.{REDACTED}']"),
        ("conn 3 (1.2.3.4:5) closed: 1000", "conn 3 (1.2.3.4:5) closed: 1000"),
        ("refused with 401: token expired", "refused with 401: token expired"),
        ("", ""),
    ],
)
def test_redact(text, expected):
    assert redact(text) == expected


@settings(max_examples=200, deadline=None)
@given(
    before=st.text(alphabet=st.characters(blacklist_characters="&=")),
    secret=st.text(
        alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=8
    ),
    after=st.text(),
    form=st.sampled_from(["?token={}", "&token={}", "Bearer {}", "bearer.{}", "apikey {}"]),
)
def test_no_credential_survives_redaction(before, secret, after, form):
    text = before + " " + form.format(secret) + " " + after
    assert secret not in redact(text) or secret in before or secret in after


ACCESS = '%s - "%s %s HTTP/%s" %d'
WEBSOCKET = '%s - "WebSocket %s" [accepted]'


def test_redact_tokens_on_a_uvicorn_access_record_keeps_its_arguments():
    rec = record(
        ACCESS,
        ("127.0.0.1:5000", "GET", f"/ws?room=lobby&token={TOKEN}", "1.1", 101),
        name="uvicorn.access",
    )
    assert RedactTokens().filter(rec) is True
    assert rec.args == ("127.0.0.1:5000", "GET", f"/ws?room=lobby&token={REDACTED}", "1.1", 101)
    assert (
        rec.getMessage() == f'127.0.0.1:5000 - "GET /ws?room=lobby&token={REDACTED} HTTP/1.1" 101'
    )
    # uvicorn's own access formatter unpacks the five arguments: still five.
    uvicorn_logging = pytest.importorskip("uvicorn.logging")
    formatter = uvicorn_logging.AccessFormatter(
        fmt='%(client_addr)s - "%(request_line)s" %(status_code)s', use_colors=False
    )
    line = formatter.format(rec)
    assert TOKEN not in line
    assert f"token={REDACTED}" in line


def test_redact_tokens_on_uvicorn_websocket_and_plain_records():
    rec = record(WEBSOCKET, ("127.0.0.1:5000", f"/ws?token={TOKEN}"), name="uvicorn.error")
    RedactTokens().filter(rec)
    assert TOKEN not in rec.getMessage()
    plain = record(f"client sent Authorization: Bearer {TOKEN}", None)
    RedactTokens().filter(plain)
    assert plain.getMessage() == f"client sent Authorization: {REDACTED}"
    mapping = record("%(target)s", ({"target": f"/ws?token={TOKEN}"},))
    RedactTokens().filter(mapping)
    assert mapping.getMessage() == f"/ws?token={REDACTED}"
    raw = record("%r", (f"bearer.{TOKEN}".encode(),))
    RedactTokens().filter(raw)
    assert TOKEN not in raw.getMessage()
    untouched = record("%d clients", (3,))
    RedactTokens().filter(untouched)
    assert untouched.args == (3,)


def test_redact_tokens_in_a_dict_config():
    import logging.config

    stream = io.StringIO()
    logging.config.dictConfig(
        {
            "version": 1,
            "disable_existing_loggers": False,
            "filters": {"redact": {"()": "roombus.logging.RedactTokens"}},
            "formatters": {"json": {"()": "roombus.logging.JsonFormatter"}},
            "handlers": {
                "test": {
                    "class": "logging.StreamHandler",
                    "stream": stream,
                    "formatter": "json",
                    "filters": ["redact"],
                }
            },
            "loggers": {
                "roombus.tests.dictconfig": {
                    "handlers": ["test"],
                    "level": "INFO",
                    "propagate": False,
                }
            },
        }
    )
    child = logging.getLogger("roombus.tests.dictconfig.access")
    child.info(ACCESS, "127.0.0.1:1", "GET", f"/ws?token={TOKEN}", "1.1", 101)
    out = json.loads(stream.getvalue())
    assert out["msg"] == f'127.0.0.1:1 - "GET /ws?token={REDACTED} HTTP/1.1" 101'
    assert out["logger"] == "roombus.tests.dictconfig.access"


def test_use_host_logging_writes_once_with_or_without_the_hosts_handlers(monkeypatch):
    from roombus.logging import use_host_logging

    roombus_log, root = logging.getLogger("roombus"), logging.getLogger()
    for logger in (roombus_log, root):
        monkeypatch.setattr(logger, "handlers", [])
        monkeypatch.setattr(logger, "level", logger.level)
    monkeypatch.setattr(roombus_log, "propagate", True)
    stream = io.StringIO()
    use_host_logging("debug", stream=stream)
    use_host_logging("debug", stream=stream)  # idempotent: still one handler
    assert len(roombus_log.handlers) == 1 and roombus_log.level == logging.DEBUG
    roombus_log.debug("refused with 403: %s", f"/ws?token={TOKEN}")
    assert stream.getvalue().count("refused with 403") == 1
    assert TOKEN not in stream.getvalue()  # redacted
    host = io.StringIO()
    root.addHandler(logging.StreamHandler(host))  # the host's logging, set up later
    logging.getLogger("roombus.backplane").info("a child's line")
    assert "a child's line" in host.getvalue() and "a child's line" not in stream.getvalue()
    root.handlers.clear()  # a host that puts its handler on roombus, propagate off
    roombus_log.addHandler(logging.StreamHandler(host))
    roombus_log.propagate = False
    roombus_log.info("once more")
    assert host.getvalue().count("once more") == 1 and "once more" not in stream.getvalue()


def test_a_format_string_naming_a_secret_still_logs_its_line_redacted() -> None:
    import io
    import logging

    from roombus.logging import RedactTokens

    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(RedactTokens())
    log = logging.getLogger("roombus.test.redact")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("GET /ws?room=a&token=%s from %s", "eyJsecret.part.sig", "10.0.0.1")
    finally:
        log.removeHandler(handler)
    line = out.getvalue()
    assert "eyJsecret" not in line
    assert "from 10.0.0.1" in line and "[redacted]" in line
