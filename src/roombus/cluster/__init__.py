"""The cluster protocol, sans-IO: records, the Redis schema, cluster room state and
the link to Redis as a state machine. The drivers (one per event loop) own the sockets."""
