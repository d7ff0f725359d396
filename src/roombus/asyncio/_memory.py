"""
A connection in memory: two :class:`asyncio.Transport` ends joined to each other, with
a socket's flow control and endings, for :meth:`roombus.asyncio.Server.connect_in_memory`.

What one end writes waits in its write buffer (the socket's send buffer, and the
network) until the other end's protocol takes it: one chunk per loop iteration, and
only while that end reads (``pause_reading`` stops it, as a full receive window does).
Past the buffer's high-water mark the writer's protocol gets ``pause_writing``, and
``resume_writing`` once it drained to the low-water mark, so a peer that does not read
pauses its writer, as over TCP, instead of growing memory.

The endings are a socket's: ``close()`` sends what is buffered, then the other end gets
``eof_received`` (and closes itself unless that returns true) and this end
``connection_lost(None)``; ``abort()`` drops the buffer, and the other end gets
``connection_lost(ConnectionResetError)`` (a reset); ``write_eof()`` is a half-close.
An end closing stops reading: what arrives for it afterwards is dropped.
"""

from __future__ import annotations

import asyncio
from typing import Any

#: The most one ``data_received`` call gets (as a socket read).
CHUNK = 256 * 1024
#: The write buffer's high-water mark when none is given (asyncio's default).
HIGH_WATER = 64 * 1024


class MemoryTransport(asyncio.Transport):
    """One end of a connection in memory; make a pair with :func:`transport_pair`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, extra: dict[str, Any]) -> None:
        super().__init__(extra)
        self._loop = loop
        self._protocol: asyncio.BaseProtocol | None = None
        self._peer: MemoryTransport | None = None
        self._buffer = bytearray()  # written here, not yet taken by the peer's protocol
        self._high = HIGH_WATER
        self._low = HIGH_WATER // 4
        self._paused = False  # our protocol was told pause_writing
        self._reading = True
        self._closing = False  # close() or abort() was called (or the peer's EOF closed us)
        self._eof = False  # write_eof(): the peer gets its EOF once the buffer is taken
        self._eof_sent = False
        self._lost = False  # our protocol got connection_lost
        self._pumping = False  # a _pump callback is scheduled

    # -- asyncio.BaseTransport ------------------------------------------------------------

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self._protocol is not None
        return self._protocol

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def is_closing(self) -> bool:
        return self._closing or self._lost

    def close(self) -> None:
        if self._closing or self._lost:
            return
        self._closing = True
        self._reading = False
        self._schedule()  # the buffer goes out, then the EOF and connection_lost

    def abort(self) -> None:
        if self._lost:
            return
        self._closing = True
        self._reading = False
        self._eof_sent = True  # a reset, no EOF
        self._buffer.clear()
        peer = self._peer
        if peer is not None and not peer._lost:
            self._loop.call_soon(peer._connection_lost, ConnectionResetError("reset by peer"))
        self._loop.call_soon(self._connection_lost, None)

    # -- asyncio.ReadTransport ------------------------------------------------------------

    def is_reading(self) -> bool:
        return self._reading

    def pause_reading(self) -> None:
        if not self.is_closing():
            self._reading = False

    def resume_reading(self) -> None:
        if not self.is_closing() and not self._reading:
            self._reading = True
            if self._peer is not None:
                self._peer._schedule()

    # -- asyncio.WriteTransport -----------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._eof:
            raise RuntimeError("Cannot call write() after write_eof()")
        if not data or self.is_closing():
            return  # as a socket transport: writes after close() are dropped
        self._buffer += data
        self._schedule()
        if not self._paused and len(self._buffer) > self._high:
            self._paused = True
            self._call("pause_writing")

    def write_eof(self) -> None:
        if self._eof or self.is_closing():
            return
        self._eof = True
        self._schedule()

    def can_write_eof(self) -> bool:
        return True

    def get_write_buffer_size(self) -> int:
        return len(self._buffer)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = 4 * low if low is not None else HIGH_WATER
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high, self._low = high, low
        if not self._paused and len(self._buffer) > high:
            self._paused = True
            self._call("pause_writing")
        elif self._paused and len(self._buffer) <= low:
            self._paused = False
            self._call("resume_writing")

    # -- moving the bytes -----------------------------------------------------------------

    def _schedule(self) -> None:
        if not self._pumping and not self._lost:
            self._pumping = True
            self._loop.call_soon(self._pump)

    def _pump(self) -> None:
        """Hand one chunk of our buffer to the peer's protocol (if it reads), then the
        EOF and our end once it is all out; a peer that is gone drops it all."""
        self._pumping = False
        if self._lost:
            return
        peer = self._peer
        assert peer is not None
        if self._buffer and peer.is_closing():
            self._buffer.clear()  # it reads no more (a reset, over TCP)
        if self._buffer and peer._reading:
            chunk = bytes(self._buffer[:CHUNK])
            del self._buffer[:CHUNK]
            peer._call("data_received", chunk)
        if self._paused and len(self._buffer) <= self._low:
            self._paused = False
            self._call("resume_writing")
        if self._buffer:
            if peer._reading:
                self._schedule()  # the next chunk, on the next iteration
            return  # else peer.resume_reading() schedules us again
        if (self._eof or self._closing) and not self._eof_sent:
            self._eof_sent = True
            if not peer.is_closing():
                peer._eof_received()
        if self._closing:
            self._connection_lost(None)

    def _eof_received(self) -> None:
        protocol = self._protocol
        keep_open = False
        if isinstance(protocol, asyncio.Protocol):
            try:
                keep_open = bool(protocol.eof_received())
            except Exception as exc:
                self._fatal(exc, "eof_received")
                return
        if not keep_open:
            self.close()

    def _connection_lost(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._closing = True
        self._reading = False
        self._buffer.clear()
        peer = self._peer
        if peer is not None:
            peer._schedule()  # what it buffered for us is dropped; it may resume writing
        if self._protocol is not None:
            self._protocol.connection_lost(exc)

    def _call(self, name: str, *args: Any) -> None:
        try:
            getattr(self._protocol, name)(*args)
        except Exception as exc:
            self._fatal(exc, name)

    def _fatal(self, exc: Exception, callback: str) -> None:
        self._loop.call_exception_handler(
            {
                "message": f"error in {callback}() of an in-memory connection's protocol",
                "exception": exc,
                "transport": self,
                "protocol": self._protocol,
            }
        )
        self.abort()


def transport_pair(
    loop: asyncio.AbstractEventLoop,
    *,
    left: dict[str, Any] | None = None,
    right: dict[str, Any] | None = None,
) -> tuple[MemoryTransport, MemoryTransport]:
    """Two ends joined to each other (*left* and *right*: their ``get_extra_info``);
    give each its protocol (``set_protocol``), then call its ``connection_made``."""
    a, b = MemoryTransport(loop, left or {}), MemoryTransport(loop, right or {})
    a._peer, b._peer = b, a
    return a, b
