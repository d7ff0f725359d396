"""
The adapters' tuning constants, one home for every transport.

These are not settings: they trade latency for system calls in ways no deployment
needs to choose, and the adapters must agree on them (the conformance suite runs the
same scenarios over each).
"""

from __future__ import annotations

from typing import Final

#: Bytes one read asks the kernel for (roombus.trio's socket reads; roombus.asyncio's
#: receive buffer).
RECEIVE_SIZE: Final = 65536

#: A sweep that writes to this many connections means the server is busy ...
BUSY_SWEEP: Final = 128
#: ... and then the next sweep waits this long (seconds), to coalesce frames: the
#: next sweep writes several per system call (the system call is the cost).
WRITE_DELAY: Final = 0.004

#: Connections accepted per wake-up of the listener, before other tasks run.
ACCEPT_BATCH: Final = 64
#: Seconds the accept loop pauses when the process is out of file descriptors or
#: memory (EMFILE, ENFILE, ENOBUFS, ENOMEM), so the clients that are there can leave.
ACCEPT_PAUSE: Final = 0.1

__all__ = ["ACCEPT_BATCH", "ACCEPT_PAUSE", "BUSY_SWEEP", "RECEIVE_SIZE", "WRITE_DELAY"]
