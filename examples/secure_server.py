"""
A roombus server that only lets in clients with a signed token, over TLS if given a
certificate, and a tool that mints such tokens.

    python3 examples/secure_server.py serve [PORT] [--certfile CERT --keyfile KEY]
    python3 examples/secure_server.py token ann 'lobby,team-*'

The secret comes from ROOMBUS_JWT_SECRET (at least 32 bytes); a demo secret is used
when it is not set. Connect with the token in a header, as a subprotocol, or in the
query string:

    python3 -m websockets 'ws://127.0.0.1:8765/ws?room=lobby&token=<TOKEN>'
"""

from __future__ import annotations

import functools
import os
import ssl
import sys
import time

import jwt

import roombus.trio
import trio
from roombus import BrokerConfig, JWTAuthenticator, ServerConfig

SECRET = os.environ.get("ROOMBUS_JWT_SECRET", "demo-secret-change-me-0123456789abcdef")


def mint(username: str, rooms: str, ttl: float = 3600) -> str:
    """A token for *username*, valid for *ttl* seconds, granting *rooms* (patterns)."""
    claims: dict[str, object] = {"sub": username, "exp": int(time.time() + ttl)}
    if rooms:
        claims["rooms"] = rooms.split(",")
    return jwt.encode(claims, SECRET, algorithm="HS256")


async def serve(port: int, ssl_context: ssl.SSLContext | None) -> None:
    authenticator = JWTAuthenticator(secret=SECRET, leeway=30)
    config = ServerConfig(
        port=port,
        allowed_origins=["https://chat.example.com"] if os.environ.get("STRICT") else [],
        max_connections_per_ip=100,
    )
    serve = functools.partial(
        roombus.trio.serve,
        BrokerConfig(rate_limit=20, rate_burst=50),  # a chat UI needs no more
        config,
        authenticator=authenticator,
        ssl_context=ssl_context,
    )
    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve)
        scheme = "wss" if ssl_context else "ws"
        print(f"listening on {scheme}://127.0.0.1:{server.port}/ws?room=lobby&token=...")
        print("mint a token: python3 examples/secure_server.py token ann lobby")


def main(argv: list[str]) -> int:
    if argv[:1] == ["token"] and len(argv) in (2, 3):
        print(mint(argv[1], argv[2] if len(argv) == 3 else ""))
        return 0
    if argv[:1] != ["serve"]:
        print(__doc__, file=sys.stderr)
        return 2
    args = argv[1:]
    context = None
    if "--certfile" in args:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        certfile = args[args.index("--certfile") + 1]
        keyfile = args[args.index("--keyfile") + 1] if "--keyfile" in args else None
        context.load_cert_chain(certfile, keyfile)
    port = int(args[0]) if args and args[0].isdigit() else 8765
    try:
        trio.run(serve, port, context)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
