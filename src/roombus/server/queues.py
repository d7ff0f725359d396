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
handed out is dropped; the chunk :meth:`SendQueue.data` already returned is kept
(it may be in flight, and a WebSocket stream cannot be cut mid-frame), so that a
close frame can follow it. Control frames (pings, pongs, close) are small and never
refused, so a close can always be queued.

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

import attrs


class QueueState(enum.Enum):
    """Where a connection's send queue stands."""

    OPEN = "open"  #: accepting frames
    OVERFLOWED = "overflowed"  #: the receiver fell behind; must be closed
    CLOSING = "closing"  #: a close frame is queued; nothing may follow it


def _refuses(queue: SendQueue | MessageQueue, size: int) -> bool:
    """
    The slow-consumer policy both queues share: refuse a message of *size* bytes that
    would cross a bound (and overflow, dropping what was not handed out), or any message
    once the queue is no longer OPEN. One message alone always fits: the bound is on a
    backlog, not on a message.
    """
    if queue.state is not QueueState.OPEN:
        return True
    if queue._data_frames >= queue.max_messages or (
        queue._data_bytes + size > queue.max_bytes and queue._data_frames
    ):
        queue.state = QueueState.OVERFLOWED
        queue._drop_unstarted()
        return True
    return False


@attrs.define
class ByteBudget:
    """
    Bytes queued across many queues (a server's sum over its send queues), against a
    limit the queues do not enforce themselves: their owner (the hub) checks it after
    writes and closes the slowest readers (:meth:`Hub.enforce_budget
    <roombus.hub.Hub.enforce_budget>`).

    Attributes:
        limit: Most bytes the owner lets wait in all queues together; 0: no limit.
        used: Bytes waiting now in the queues that share this budget.
    """

    limit: int = 0
    used: int = 0


@attrs.define
class SendQueue:
    """
    A bounded queue of outgoing frames for one connection.

    Frames wait in a list until :meth:`data` joins them into one *chunk*, which is
    then written until done; frames pushed meanwhile wait for the next chunk. A data
    frame counts against the bounds until its chunk is completely written.

    Args:
        max_messages: Most data frames that may wait.
        max_bytes: Most bytes of data frames that may wait.
        budget: Shared by the queues of one server: its ``used`` is kept equal to the
            sum of their :attr:`nbytes` (until :meth:`detach`).
    """

    max_messages: int
    max_bytes: int
    state: QueueState = QueueState.OPEN
    budget: ByteBudget = attrs.field(factory=ByteBudget, kw_only=True)
    _pending: list[bytes] = attrs.field(factory=list)  # frames not yet in a chunk
    _pending_control: int = 0  # control frames among them
    _pending_control_bytes: int = 0
    _pending_pong: int = -1  # index of a pong among the pending frames, if any
    _chunk: bytes = b""  # the bytes being written
    _chunk_sent: int = 0  # how much of the chunk is written
    _chunk_data: int = 0  # data frames in the chunk
    _chunk_data_bytes: int = 0
    _data_frames: int = 0  # data frames waiting, in the chunk or not
    _data_bytes: int = 0
    _nbytes: int = 0  # every byte still to write

    @property
    def messages(self) -> int:
        """Data frames waiting (control frames not counted); never above ``max_messages``."""
        return self._data_frames

    @property
    def data_bytes(self) -> int:
        """Bytes of data frames waiting; never above ``max_bytes``."""
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
        size = len(frame)
        # The common case in line (one call less per delivery on the fan-out path): an
        # OPEN queue with room for it. Anything else is _refuses' to decide.
        if not (
            self.state is QueueState.OPEN
            and self._data_frames < self.max_messages
            and self._data_bytes + size <= self.max_bytes
        ) and _refuses(self, size):
            return False
        self._pending.append(frame)
        self._data_frames += 1
        self._data_bytes += size
        self._nbytes += size
        self.budget.used += size
        return True

    def push_control(self, frame: bytes) -> bool:
        """Queue a ping or pong frame; refused only after a close frame."""
        if self.state is QueueState.CLOSING:
            return False
        self._push_control(frame)
        return True

    def push_pong(self, frame: bytes) -> bool:
        """
        Queue a pong, replacing one still waiting: only the latest ping needs an answer
        (RFC 6455 5.5.3), so a ping flood cannot grow the queue.
        """
        if self.state is QueueState.CLOSING:
            return False
        pending = self._pending
        if self._pending_pong >= 0:
            old = pending[self._pending_pong]
            pending[self._pending_pong] = frame
            delta = len(frame) - len(old)
            self._pending_control_bytes += delta
            self._nbytes += delta
            self.budget.used += delta
            return True
        self._pending_pong = len(pending)
        self._push_control(frame)
        return True

    def _push_control(self, frame: bytes) -> None:
        self._pending.append(frame)
        self._pending_control += 1
        self._pending_control_bytes += len(frame)
        self._nbytes += len(frame)
        self.budget.used += len(frame)

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
        self._push_control(frame)
        return True

    def data(self) -> bytes | memoryview:
        """The bytes to write next (many frames joined); empty if none."""
        if not self._chunk:
            pending = self._pending
            if not pending:
                return b""
            self._chunk = pending[0] if len(pending) == 1 else b"".join(pending)
            self._chunk_data = len(pending) - self._pending_control
            self._chunk_data_bytes = len(self._chunk) - self._pending_control_bytes
            pending.clear()
            self._pending_control = self._pending_control_bytes = 0
            self._pending_pong = -1
        if self._chunk_sent:
            return memoryview(self._chunk)[self._chunk_sent :]
        return self._chunk

    def take(self) -> bytes | memoryview:
        """
        :meth:`data`, reported written in full (``consume(len(data))``): for a
        transport that takes every byte it is handed (asyncio's ``transport.write``
        buffers what the kernel does not take). One call per write instead of two.
        """
        if self._chunk:  # a chunk partly written: its rest
            data = self.data()
            self.consume(len(data))
            return data
        pending = self._pending
        if not pending:
            return b""
        chunk = pending[0] if len(pending) == 1 else b"".join(pending)
        n = len(chunk)
        self._data_frames -= len(pending) - self._pending_control
        self._data_bytes -= n - self._pending_control_bytes
        self._nbytes -= n
        self.budget.used -= n
        pending.clear()
        self._pending_control = self._pending_control_bytes = 0
        self._pending_pong = -1
        return chunk

    def consume(self, n: int) -> None:
        """Report that the first *n* bytes of :meth:`data` were written."""
        if n == 0:
            return
        if not self._chunk:
            self.data()
        if n < 0 or n > len(self._chunk) - self._chunk_sent:
            raise ValueError(
                f"cannot consume {n} of {len(self._chunk) - self._chunk_sent} bytes of data()"
            )
        self._nbytes -= n
        self.budget.used -= n
        self._chunk_sent += n
        if self._chunk_sent == len(self._chunk):
            self._data_frames -= self._chunk_data
            self._data_bytes -= self._chunk_data_bytes
            self._chunk = b""
            self._chunk_sent = self._chunk_data = self._chunk_data_bytes = 0

    def _drop_unstarted(self) -> None:
        """Drop every frame not yet handed out; the chunk :meth:`data` returned is finished
        first, even if none of it was reported written yet: a driver may be awaiting its
        write (and will :meth:`consume` it), and a stream cannot be cut mid-frame."""
        kept = len(self._chunk) - self._chunk_sent
        self.budget.used -= self._nbytes - kept
        self._nbytes = kept
        self._data_frames = self._chunk_data
        self._data_bytes = self._chunk_data_bytes
        self._pending.clear()
        self._pending_control = self._pending_control_bytes = 0
        self._pending_pong = -1

    def detach(self) -> None:
        """Stop counting this queue in its shared budget (the connection is lost, or
        closed as slow: what it still holds is no longer the others' concern)."""
        self.budget.used -= self._nbytes
        self.budget = ByteBudget(used=self._nbytes)


@attrs.frozen
class CloseMessage:
    """
    The close that ends a :class:`MessageQueue`: the transport closes with this code.

    Attributes:
        code: The WebSocket close code.
        reason: The close reason (at most 123 UTF-8 bytes).
    """

    code: int
    reason: str


#: What a :class:`MessageQueue` hands out: a text message's UTF-8 payload, or the close.
OutMessage = bytes | CloseMessage


@attrs.define
class MessageQueue:
    """
    The same policy for a transport that frames messages itself (an ASGI server).

    It holds whole text messages (their UTF-8 payloads, unframed) and, last, at most
    one :class:`CloseMessage`, and has the states and bounds of :class:`SendQueue`.
    :meth:`data` hands out every pending message as one *batch*; the transport sends
    them one by one and reports each with ``consume(1)``. A message counts against the
    bounds until it is reported sent, and a batch handed out is never dropped (the
    driver may be awaiting a send of it), so a close always follows it.

    Args:
        max_messages: Most data messages that may wait.
        max_bytes: Most bytes of data messages that may wait.
        budget: As for :class:`SendQueue`; its ``used`` counts :attr:`data_bytes`.
    """

    max_messages: int
    max_bytes: int
    state: QueueState = QueueState.OPEN
    budget: ByteBudget = attrs.field(factory=ByteBudget, kw_only=True)
    _pending: list[OutMessage] = attrs.field(factory=list)  # not yet in a batch
    _batch: list[OutMessage] = attrs.field(factory=list)  # handed out
    _batch_sent: int = 0  # how much of the batch is sent
    _data_frames: int = 0  # data messages waiting, in the batch or not
    _data_bytes: int = 0

    @property
    def messages(self) -> int:
        """Data messages waiting; never above ``max_messages``."""
        return self._data_frames

    @property
    def data_bytes(self) -> int:
        """Bytes of data messages waiting; never above ``max_bytes``."""
        return self._data_bytes

    def __bool__(self) -> bool:
        return bool(self._pending) or self._batch_sent < len(self._batch)

    def push(self, payload: bytes) -> bool:
        """
        Queue a text message (its UTF-8 payload).

        Returns:
            True if queued; False if refused, exactly as :meth:`SendQueue.push`.
        """
        size = len(payload)
        if _refuses(self, size):
            return False
        self._pending.append(payload)
        self._data_frames += 1
        self._data_bytes += size
        self.budget.used += size
        return True

    def close_with(self, close: CloseMessage, *, drop_pending: bool) -> bool:
        """
        Queue the close; nothing can be queued after it.

        Args:
            close: The close code and reason.
            drop_pending: Drop messages not yet handed out first.

        Returns:
            False if a close was already queued.
        """
        if self.state is QueueState.CLOSING:
            return False
        if drop_pending:
            self._drop_unstarted()
        self.state = QueueState.CLOSING
        self._pending.append(close)
        return True

    def data(self) -> list[OutMessage]:
        """The messages to send next, in order (a new batch once the last is sent)."""
        if self._batch_sent == len(self._batch):
            self._batch, self._pending = self._pending, []
            self._batch_sent = 0
        return self._batch[self._batch_sent :]

    def consume(self, n: int) -> None:
        """Report that the first *n* messages of :meth:`data` were sent."""
        if n == 0:
            return
        if self._batch_sent == len(self._batch):
            self.data()
        start = self._batch_sent
        if n < 0 or n > len(self._batch) - start:
            raise ValueError(f"cannot consume {n} of {len(self._batch) - start} messages of data()")
        for item in self._batch[start : start + n]:
            if type(item) is bytes:
                self._data_frames -= 1
                self._data_bytes -= len(item)
                self.budget.used -= len(item)
        self._batch_sent = start + n

    def _drop_unstarted(self) -> None:
        """Drop every message not yet handed out; the batch is kept (see the class)."""
        self._pending.clear()
        rest = [m for m in self._batch[self._batch_sent :] if type(m) is bytes]
        self._data_frames = len(rest)
        kept = sum(len(m) for m in rest)
        self.budget.used -= self._data_bytes - kept
        self._data_bytes = kept

    def detach(self) -> None:
        """As :meth:`SendQueue.detach`."""
        self.budget.used -= self._data_bytes
        self.budget = ByteBudget(used=self._data_bytes)
