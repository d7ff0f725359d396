"""
Admission: the connection limits, per client address and in total. Sans-IO.

The hub counts every transport connection here as it opens and as it is lost, and
asks, for each new one, whether it is over a limit (what :meth:`Admission.add` returns) and
whether it is so far over that it gets no answer at all (:meth:`Admission.far_over`).
A connection over a limit is still read: a probe (:data:`PROBE_BUDGET`) is answered
anyway; anything else gets the limit's 429 or 503, with ``Retry-After``
(:data:`RETRY_AFTER`).
"""

from __future__ import annotations

import logging
from typing import Final

from ..core.names import ConnectionId
from .config import ServerConfig
from .http import HttpResponse

log: Final = logging.getLogger("roombus")

#: Probes (``GET``/``HEAD`` of ``/healthz``, and of ``/metrics`` when it is on) from
#: connections over a connection limit that are answered anyway, at most this many at
#: once (answered and not yet gone); others over a limit get its 429 or 503. A load
#: balancer probing a full node must not see it as down, and a probe is no cheaper to
#: hold than any connection over a limit: the handshake timeout to send its request,
#: the close timeout to take its answer, and the far-over cut
#: (:meth:`Admission.far_over`) still applies, so probes hold no descriptor the limits
#: did not already allow.
PROBE_BUDGET: Final = 8

#: The headers of a refusal for a connection limit: when to try again, in seconds.
RETRY_AFTER: Final = ((b"retry-after", b"5"),)


class Admission:
    """
    Transport connections counted against :class:`ServerConfig`'s connection limits.

    A connection with no IP address (``ip`` None: a Unix socket, a stream handed in)
    counts only against the total.
    """

    __slots__ = ("_per_ip", "_probes", "config", "refusals")

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        #: Requests refused because of a connection limit since the start.
        self.refusals = 0
        self._per_ip: dict[str, int] = {}
        # Over-limit connections answered as probes, until they are lost.
        self._probes: set[ConnectionId] = set()

    def add(self, ip: str | None, total: int) -> HttpResponse | None:
        """
        Count a new connection from *ip*, *total* connections open with it. Returns the
        answer for it if it is beyond a connection limit, else None. A refusal is
        counted and logged once given (:meth:`refused`): a probe may be spared.
        """
        config = self.config
        over_ip = None if ip is None else self.add_address(ip)
        if config.max_connections and total > config.max_connections:
            return HttpResponse(
                status=503, body=b"server full: too many connections\n", headers=RETRY_AFTER
            )
        return over_ip

    def add_address(self, ip: str) -> HttpResponse | None:
        """
        Count a connection already counted in the total (:meth:`add` with no address)
        against *ip*, now that its client is known (behind a proxy); the 429 if that
        puts it over the per-address limit, else None.
        """
        count = self._per_ip.get(ip, 0) + 1
        self._per_ip[ip] = count
        limit = self.config.max_connections_per_ip
        if limit and count > limit:
            return HttpResponse(
                status=429, body=b"too many connections from your address\n", headers=RETRY_AFTER
            )
        return None

    def remove(self, cid: ConnectionId, ip: str | None) -> None:
        """Connection *cid* from *ip* is gone (it was counted by :meth:`add`)."""
        self._probes.discard(cid)
        if ip is not None:
            count = self._per_ip[ip] - 1
            if count:
                self._per_ip[ip] = count
            else:
                del self._per_ip[ip]

    def count(self, ip: str) -> int:
        """Connections open from *ip*."""
        return self._per_ip.get(ip, 0)

    def far_over(self, ip: str | None, total: int) -> bool:
        """
        Whether a connection over a limit is so far over it (twice the per-address
        limit, or an eighth over the total; at least 64 either way) that it gets no
        answer at all: descriptors are what is scarce.
        """
        config = self.config
        per_ip, limit = config.max_connections_per_ip, config.max_connections
        return bool(
            (per_ip and ip is not None and self._per_ip[ip] > 2 * max(per_ip, 64))
            or (limit and total > limit + max(limit // 8, 64))
        )

    def refused(self, peer: str, refusal: HttpResponse, *, cid: ConnectionId | None = None) -> None:
        """A connection from *peer* (*cid*, if it has one yet) was refused with
        *refusal*, for a limit."""
        self.refusals += 1
        extra: dict[str, object] = {"peer": peer, "status": refusal.status}
        if cid is not None:
            extra["conn"] = cid
        if refusal.status == 503:
            extra["reason"] = "max-connections"
            limit = self.config.max_connections
            log.info("%s refused: over max-connections (%d)", peer, limit, extra=extra)
        else:
            extra["reason"] = "max-connections-per-ip"
            limit = self.config.max_connections_per_ip
            log.info("%s refused: over max-connections-per-ip (%d)", peer, limit, extra=extra)

    def spared(self, cid: ConnectionId, method: bytes, target: bytes) -> bool:
        """Whether a request over a limit is a probe answered anyway (see PROBE_BUDGET)."""
        if method not in (b"GET", b"HEAD") or len(self._probes) >= PROBE_BUDGET:
            return False
        path = target.partition(b"?")[0]
        if path == b"/healthz" or (path == b"/metrics" and self.config.metrics):
            self._probes.add(cid)
            return True
        return False
