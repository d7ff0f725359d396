"""
Bursts, over every transport: a client that writes many messages in one TCP write must
not get readers that keep up closed as slow, nor itself when it reads its own replies.
roombus's own servers read such a burst a batch at a time, writing between batches; an
ASGI server hands messages over one by one, and the app lets the writers run between.
"""

from __future__ import annotations

import json
import threading

from .rawws import OP_CLOSE, OP_PING, OP_TEXT, RawWS, client_frame

#: The defaults of the original report: a burst allowance above the queue bound.
OLD_DEFAULTS = {"send_queue": 1024, "rate_burst": 2000}


def _reader(ws: RawWS, want: int, got: dict[str, object]) -> None:
    """Read until *want* text messages came or the server closed; record what came."""
    texts = 0
    code = None
    try:
        while texts < want:
            frame = ws.recv_frame(timeout=15)
            if frame.opcode == OP_TEXT:
                texts += 1
            elif frame.opcode == OP_PING:
                continue
            elif frame.opcode == OP_CLOSE:
                code = frame.close_code
                break
    except Exception as exc:  # a timeout or EOF: recorded, asserted below
        got["error"] = repr(exc)
    got["texts"] = texts
    got["code"] = code


def _join(server, n: int) -> list[RawWS]:
    readers = []
    for i in range(n):
        ws = server.raw(username=f"r{i}")
        ws.recv_json()  # own join
        ws.recv_json()  # presence_state
        readers.append(ws)
    for i, ws in enumerate(readers):  # later joins
        for _ in range(n - 1 - i):
            ws.recv_json()
    return readers


def test_a_burst_in_one_write_reaches_every_reader_that_keeps_reading(make_server):
    server = make_server(**OLD_DEFAULTS)
    readers = _join(server, 20)
    sender = server.raw(username="sender")
    sender.recv_json()
    sender.recv_json()
    for ws in readers:
        ws.recv_json()  # the sender's join
    n = 1100
    results: list[dict[str, object]] = [{} for _ in range(len(readers) + 1)]
    threads = [
        threading.Thread(target=_reader, args=(ws, n, got))
        for ws, got in zip([*readers, sender], results, strict=True)
    ]
    for t in threads:
        t.start()
    burst = b"".join(
        client_frame(OP_TEXT, json.dumps({"type": "chat", "content": i}).encode()) for i in range(n)
    )
    sender.send_raw(burst)  # one write
    for t in threads:
        t.join(30)
    assert results == [{"texts": n, "code": None}] * len(results)
    server.assert_serving()


def test_a_client_reading_more_refusals_than_its_queue_holds_gets_them_all(make_server):
    server = make_server(**OLD_DEFAULTS)
    sender = server.raw(username="sender")
    sender.recv_json()
    sender.recv_json()
    n = 1500
    got: dict[str, object] = {}
    reader = threading.Thread(target=_reader, args=(sender, n, got))
    reader.start()
    refused = client_frame(OP_TEXT, json.dumps({"type": "join", "room": "no room!"}).encode())
    sender.send_raw(refused * n)  # one write, 1,500 errors back
    reader.join(30)
    assert got == {"texts": n, "code": None}


def _read_until_done(ws: RawWS, got: dict[str, object]) -> None:
    """Read until the chat "done" comes back, or the server closed."""
    code = None
    try:
        while True:
            frame = ws.recv_frame(timeout=15)
            if frame.opcode == OP_CLOSE:
                code = frame.close_code
                break
            if frame.opcode == OP_TEXT:
                msg = json.loads(frame.payload)
                if msg.get("type") == "chat" and msg.get("content") == "done":
                    break
    except Exception as exc:  # a timeout or EOF: recorded, asserted below
        got["error"] = repr(exc)
    got["code"] = code


def test_a_burst_of_joins_and_leaves_from_outside_reaches_the_room(make_server):
    """600 join/leave pairs of "lobby" in one write from a client in another room: every
    reader in the lobby reads all 1,200 presence messages, and nobody is closed."""
    server = make_server(**OLD_DEFAULTS)
    readers = _join(server, 20)
    outsider = server.raw("elsewhere", "outsider")
    outsider.recv_json()
    outsider.recv_json()
    n = 600
    results: list[dict[str, object]] = [{} for _ in readers]
    threads = [
        threading.Thread(target=_reader, args=(ws, 2 * n, got))
        for ws, got in zip(readers, results, strict=True)
    ]
    own: dict[str, object] = {}
    threads.append(threading.Thread(target=_read_until_done, args=(outsider, own)))
    for t in threads:
        t.start()
    pair = client_frame(OP_TEXT, json.dumps({"type": "join", "room": "lobby"}).encode())
    pair += client_frame(OP_TEXT, json.dumps({"type": "leave", "room": "lobby"}).encode())
    done = client_frame(
        OP_TEXT, json.dumps({"type": "chat", "room": "elsewhere", "content": "done"}).encode()
    )
    outsider.send_raw(pair * n + done)  # one write
    for t in threads:
        t.join(30)
    assert results == [{"texts": 2 * n, "code": None}] * len(readers)
    assert own == {"code": None}
    server.assert_serving()
