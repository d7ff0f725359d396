"""
The slow-consumer policy: one connection's bounded queue of outgoing frames.

Theory of operation
-------------------
A driver writes frames for a connection into its SendQueue, then writes
:meth:`SendQueue.data` to the network as far as the kernel takes it and reports
what went out with :meth:`SendQueue.consume`. Frames pending together are written
together (one system call for many frames).

The queue is bounded twice: in frames (``max_messages``) and in bytes
(``max_bytes``). A frame that would cross either bound is refused, and the queue
becomes OVERFLOWED: the receiver is too slow, and the policy is to give up on it
rather than make anyone else wait or grow memory. What was queued and not yet
started is dropped; a frame already partly written is kept (a WebSocket stream
cannot be cut mid-frame), so that a close frame can follow it. Control frames
(pings, pongs, close) are small and never refused, so a close can always be
queued.

States and what each input does:

=========== ================== ===================== ==================
state        push (fits)        push (does not fit)   close_with(frame)
=========== ================== ===================== ==================
OPEN         queued             -> OVERFLOWED         -> CLOSING
OVERFLOWED   refused            refused               -> CLOSING
CLOSING      refused            refused               refused
=========== ================== ===================== ==================
"""

from __future__ import annotations

import enum
import itertools
from collections import deque

import attrs

#: Write at most this much in one call; big enough to coalesce many frames.
MAX_WRITE = 256 * 1024


class QueueState(enum.Enum):
    """Where a connection's send queue stands."""

    OPEN = "open"  #: accepting frames
    OVERFLOWED = "overflowed"  #: the receiver fell behind; must be closed
    CLOSING = "closing"  #: a close frame is queued; nothing may follow it


@attrs.define
class SendQueue:
    """
    A bounded queue of outgoing frames for one connection.

    Args:
        max_messages: Most data frames that may wait.
        max_bytes: Most bytes of data frames that may wait.
    """

    max_messages: int
    max_bytes: int
    state: QueueState = QueueState.OPEN
    # (frame, counts against the bounds): data frames count, control frames do not.
    _frames: deque[tuple[bytes, bool]] = attrs.field(factory=deque)
    _nbytes: int = 0  # bytes pending, the head's unsent part included
    _data_bytes: int = 0  # bytes of pending data frames (whole frames)
    _data_frames: int = 0  # pending data frames
    _head_sent: int = 0  # bytes of the head frame already written

    @property
    def messages(self) -> int:
        """Data frames pending (control frames not counted)."""
        return self._data_frames

    @property
    def data_bytes(self) -> int:
        """Bytes of pending data frames; never above ``max_bytes``."""
        return self._data_bytes

    @property
    def nbytes(self) -> int:
        """Bytes still to write, control frames included."""
        return self._nbytes

    def __bool__(self) -> bool:
        return self._nbytes > 0

    def push(self, frame: bytes) -> bool:
        """
        Queue a data frame.

        Returns:
            True if queued. False if refused: because it would cross a bound (the
            queue is then OVERFLOWED and its unstarted frames are dropped), or
            because the queue is no longer OPEN.
        """
        if self.state is not QueueState.OPEN:
            return False
        size = len(frame)
        if self._data_frames >= self.max_messages or self._data_bytes + size > self.max_bytes:
            self.state = QueueState.OVERFLOWED
            self._drop_unstarted()
            return False
        self._frames.append((frame, True))
        self._nbytes += size
        self._data_bytes += size
        self._data_frames += 1
        return True

    def push_control(self, frame: bytes) -> bool:
        """Queue a ping or pong frame; refused only after a close frame."""
        if self.state is QueueState.CLOSING:
            return False
        self._frames.append((frame, False))
        self._nbytes += len(frame)
        return True

    def close_with(self, frame: bytes, *, drop_pending: bool) -> bool:
        """
        Queue a close frame; nothing can be queued after it.

        Args:
            frame: The close frame.
            drop_pending: Drop frames not yet started first (a close that should not
                wait for a backlog).

        Returns:
            False if a close frame was already queued.
        """
        if self.state is QueueState.CLOSING:
            return False
        if drop_pending:
            self._drop_unstarted()
        self.state = QueueState.CLOSING
        self._frames.append((frame, False))
        self._nbytes += len(frame)
        return True

    def data(self) -> bytes:
        """The bytes to write next (several frames joined); empty if none."""
        frames = self._frames
        if not frames:
            return b""
        head = frames[0][0]
        if self._head_sent:
            head = head[self._head_sent :]
        if len(frames) == 1:
            return head
        parts = [head]
        size = len(head)
        for frame, _ in itertools.islice(frames, 1, None):
            if size >= MAX_WRITE:
                break
            parts.append(frame)
            size += len(frame)
        return b"".join(parts)

    def consume(self, n: int) -> None:
        """Report that the first *n* bytes of :meth:`data` were written."""
        if n < 0 or n > self._nbytes:
            raise ValueError(f"cannot consume {n} of {self._nbytes} pending bytes")
        self._nbytes -= n
        frames = self._frames
        n += self._head_sent
        while frames and n >= len(frames[0][0]):
            frame, counted = frames.popleft()
            n -= len(frame)
            if counted:
                self._data_frames -= 1
                self._data_bytes -= len(frame)
        self._head_sent = n

    def _drop_unstarted(self) -> None:
        frames = self._frames
        keep = frames.popleft() if self._head_sent else None
        while frames:
            frame, counted = frames.pop()
            self._nbytes -= len(frame)
            if counted:
                self._data_frames -= 1
                self._data_bytes -= len(frame)
        if keep is not None:
            frames.append(keep)
