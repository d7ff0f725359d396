"""
Logging helpers for a roombus server's log and the ASGI server's around it.

* :class:`JsonFormatter`: one JSON object per line (``roombus serve --log-format
  json``), with a connection's fields (``conn``, ``peer``, ``user``, ``room``,
  ``code``, ``reason``, ``status``) when the record has them;
* :class:`RedactTokens`: a :class:`logging.Filter` that rewrites a record's message
  and arguments so that no token shows: ``token=...`` in a URL's query,
  ``Bearer ...`` and ``apikey ...`` credentials, ``Authorization:`` headers and
  ``bearer.<token>`` subprotocols. ``roombus serve`` puts it on its handler; put it
  on an ASGI server's handlers too, since uvicorn logs each request line and each
  WebSocket's path with its query string (``?token=``)::

      {"version": 1, "disable_existing_loggers": false,
       "filters": {"redact": {"()": "roombus.logging.RedactTokens"}},
       "formatters": {"json": {"()": "roombus.logging.JsonFormatter"}},
       "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "json",
                               "filters": ["redact", "use_host_logging"]}},
       "root": {"handlers": ["stderr"], "level": "INFO"},
       "loggers": {"uvicorn": {"propagate": true}, "uvicorn.access": {"propagate": true}}}

  (``uvicorn --log-config that.json``; see docs/security.md).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping
from typing import Any, Final

from .server.redact import REDACTED, redact

#: The structured fields of a connection's log records (``extra={...}``), in the
#: order :class:`JsonFormatter` writes them.
FIELDS: Final = ("conn", "peer", "user", "room", "code", "reason", "status")

#: The format of ``roombus serve --log-format text``.
TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _jsonable(value: object) -> object:
    """*value* if JSON can carry it as it is, else its ``repr`` (or its type's name)."""
    if value is None or type(value) in (str, bool):
        return value
    try:
        json.dumps(value, allow_nan=False)
        return value
    except Exception:
        pass
    try:
        return repr(value)
    except Exception:
        return f"<unrepresentable {type(value).__name__}>"


def _message(record: logging.LogRecord) -> str:
    try:
        return record.getMessage()
    except Exception:  # arguments that do not fit the format: show both
        return f"{_jsonable(record.msg)} % {_jsonable(record.args)}"


class JsonFormatter(logging.Formatter):
    """
    One JSON object per line: ``ts`` (ISO 8601, UTC, milliseconds:
    ``2025-01-31T12:00:00.123Z``), ``level``, ``logger``, ``msg`` (the formatted
    message), then those of :data:`FIELDS` the record has (``extra={"conn": 7}``;
    None is left out), and ``exc`` (the traceback) and ``stack`` when there are.

    It never raises for what a record carries: a value JSON cannot hold is written as
    its ``repr``. Non-ASCII text is escaped, so every line is ASCII.
    """

    def format(self, record: logging.LogRecord) -> str:
        created = record.created
        out: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
            + f".{int(created * 1000) % 1000:03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": _message(record),
        }
        fields = record.__dict__
        for name in FIELDS:
            value = fields.get(name)
            if value is not None:
                out[name] = _jsonable(value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        try:
            return json.dumps(out, ensure_ascii=True, allow_nan=False)
        except Exception:  # a field that passed alone and fails together: be safe
            return json.dumps({k: repr(v) for k, v in out.items()}, ensure_ascii=True)


def _redact_arg(value: object) -> object:
    if type(value) is str:
        return redact(value)
    if type(value) is bytes:
        text = value.decode("latin-1")
        cleaned = redact(text)
        return value if cleaned == text else cleaned.encode("latin-1")
    return value


class RedactTokens(logging.Filter):
    """
    A filter that hides credentials in every record it sees, and lets every record
    through. It rewrites the message (``record.msg``) and each string argument
    (``record.args``, a tuple or a mapping) in place, keeping their number and order,
    so formatters that read the arguments (uvicorn's access formatter does) still
    work: ``GET /ws?room=a&token=eyJ... HTTP/1.1`` is logged as
    ``GET /ws?room=a&token=[redacted] HTTP/1.1``.

    Put it on a **handler** (``handler.addFilter(RedactTokens())``, or ``"filters"``
    in a ``dictConfig``): a logger's filters see only the records logged on that
    logger itself, not those of its children.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            if isinstance(record.msg, str) and redact(record.msg) != record.msg:
                # The format string itself names a secret's place ("token=%s"): its
                # placeholders would no longer match the arguments; redact the text.
                record.msg = redact(record.getMessage())
                record.args = None
                return True
            args = record.args
            if isinstance(args, tuple):
                record.args = tuple(_redact_arg(a) for a in args)
            elif isinstance(args, Mapping):
                record.args = {k: _redact_arg(v) for k, v in args.items()}
        except Exception:  # never lose a record to the filter
            pass
        return True


def _handler(log_format: str, stream: Any) -> logging.Handler:
    """The handler of ``roombus serve``: *log_format* (``text`` or ``json``), redacted."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    handler.addFilter(RedactTokens())
    return handler


class _Fallback(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler :func:`use_host_logging` puts on the ``roombus`` logger: it writes
    a record only if no other handler gets it (on its way from its logger up to the
    root, as :meth:`logging.Logger.callHandlers` goes), so it never doubles a line the
    host's own logging writes (``--log-config``, ``logging.basicConfig``, set up
    before or after it)."""

    def emit(self, record: logging.LogRecord) -> None:
        logger: logging.Logger | None = logging.getLogger(record.name)
        while logger is not None:
            if any(h is not self for h in logger.handlers):
                return  # the host's handler writes it
            if not logger.propagate:
                break
            logger = logger.parent
        super().emit(record)


def use_host_logging(level: str, log_format: str = "text", stream: Any = None) -> None:
    """
    Make the ``roombus`` logger's lines visible inside a host's process (an ASGI
    server's): set its level to *level* (``debug`` ...), and give it a stderr handler
    (*log_format*, with :class:`RedactTokens`) that writes a record only when no
    handler of the host's gets it (uvicorn's default configures only its own loggers).
    ``roombus.asgi.create_app`` calls it; idempotent.
    """
    logger = logging.getLogger("roombus")
    logger.setLevel(level.upper())
    if any(isinstance(h, _Fallback) for h in logger.handlers):
        return
    handler = _Fallback(sys.stderr if stream is None else stream)
    handler.setFormatter(
        JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    handler.addFilter(RedactTokens())
    logger.addHandler(handler)


__all__ = [
    "FIELDS",
    "REDACTED",
    "TEXT_FORMAT",
    "JsonFormatter",
    "RedactTokens",
    "redact",
    "use_host_logging",
]
