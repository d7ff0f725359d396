"""The sans-IO server: HTTP handshake, WebSocket wire, send queues and the hub.

Bytes (or whole messages) and the current time in; bytes to write, transports to
close and the next deadline out."""
