"""
Mount roombus in a FastAPI app, next to routes of your own.

The WebSocket endpoint (/ws), /healthz and the chat page (/) come from roombus; the
app adds a JSON view of the rooms and an endpoint that publishes an announcement.
It needs roombus's ASGI extra, FastAPI and an ASGI server:

    python3 -m pip install '.[asgi]' fastapi uvicorn

Run it from the repository's root with uvicorn, which owns the pings:

    uvicorn examples.fastapi_app:app --ws-ping-interval 20 --ws-ping-timeout 10

then open http://127.0.0.1:8000/ (the chat page), and try:

    curl http://127.0.0.1:8000/api/rooms
    curl -X POST 'http://127.0.0.1:8000/api/announce?text=hello'

A room name roombus refuses (``room=bad%20room``) is answered 400 with a JSON body.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, HTTPException

import roombus
from roombus import BrokerConfig, ServerConfig
from roombus.asgi import RoombusASGI


def on_notice(notice: roombus.Notice) -> None:
    # Called synchronously for every UserJoined, UserLeft and MessagePublished.
    print("notice:", notice, flush=True)


bus = RoombusASGI(
    BrokerConfig(heartbeat=False),  # uvicorn pings (--ws-ping-interval)
    ServerConfig(page=Path(__file__).with_name("chat.html").read_bytes()),
    on_notice=on_notice,
)
# A mounted app gets no lifespan events of its own: this shuts it down with the app.
app = FastAPI(lifespan=bus.lifespan)


@app.get("/api/rooms")
async def rooms() -> dict[str, dict[str, list[str]]]:
    return {"rooms": {room: list(bus.broker.members(room)) for room in bus.broker.rooms}}


@app.post("/api/announce")
async def announce(text: str, room: str = "lobby") -> dict[str, object]:
    # In the event loop that serves the app, as bus.publish() requires. publish()
    # raises ValueError for a room name or content it refuses: answer 400, not 500.
    try:
        sent = bus.publish(room, {"announcement": text}, username="server")
    except ValueError as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from None
    position = sent.position
    return {
        "delivered": sent.delivered,
        "position": None if position is None else {"epoch": position.epoch, "seq": position.seq},
    }


app.mount("/", bus)  # last, so that the routes above come first
