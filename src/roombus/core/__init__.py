"""The pure core: rooms, presence, heartbeat, rate limit, codec, events, actions and their config.

No I/O, no clock, no event loop: events and the current time in, actions out."""
