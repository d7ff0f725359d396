"""
Presence through Redis outages, on the model backplane: live users never leave and
come back on other nodes' screens, and a departure is seen within the TTL of the
moment the cluster can know it.

An outage here is every node losing its link while Redis keeps its data and its clock
runs on (paused, full, at ``maxclients``): when it is back, the entries no node could
renew have expired (:meth:`ModelBackplane.expire`, published as ``x`` records).
"""

from __future__ import annotations

from .test_broker import NODES, Client, Cluster, online_cluster, told


def pause(cl: Cluster) -> None:
    """Every node loses Redis, and every entry expires meanwhile."""
    for node in NODES:
        cl.lose(node)
    for node in NODES:
        cl.bp.expire(node, set())


def back(cl: Cluster, node: str) -> None:
    """*node* reconnects; its settling read (a TTL later) not yet."""
    cl.restore(node)
    cl.bp.links[node].reread = False
    cl.bp.drain()


def dan_leaves_in_a_pause() -> tuple[Cluster, Client, int]:
    """ann and dan on n1, bob on n2; Redis pauses and dan leaves meanwhile. Returns
    the cluster, bob, and how much bob had been told before."""
    cl = online_cluster()
    cl.connect("n1", "ann", "r1")
    dan = cl.clients[cl.connect("n1", "dan", "r1")]
    bob = cl.clients[cl.connect("n2", "bob", "r1")]
    cl.quiesce()
    seen = len(told(bob))
    pause(cl)
    cl.disconnect(dan)
    return cl, bob, seen


def test_a_redis_pause_makes_no_one_flicker() -> None:
    """n2 is back first and finds r1 empty (every entry expired): it keeps ann and cy.
    n1 comes back and re-announces ann; n3 died meanwhile: cy leaves, once, at n2's
    settling read."""
    cl = online_cluster()
    cl.connect("n1", "ann", "r1")
    bob = cl.clients[cl.connect("n2", "bob", "r1")]
    cl.connect("n3", "cy", "r1")
    cl.quiesce()
    seen = len(told(bob))
    pause(cl)
    cl.kill("n3")
    back(cl, "n2")
    assert told(bob)[seen:] == []
    assert cl.brokers["n2"].members("r1") == ["ann", "bob", "cy"]
    back(cl, "n1")
    assert told(bob)[seen:] == []  # ann confirmed, no news
    cl.bp.reread("n2")
    cl.bp.drain()
    assert told(bob)[seen:] == [("leave", "cy")]
    assert cl.brokers["n2"].members("r1") == ["ann", "bob"]
    cl.bp.reread("n1")
    cl.quiesce()
    cl.check_quiet()


def test_a_user_who_left_during_the_pause_leaves_as_soon_as_their_node_is_back() -> None:
    """dan left n1 during the pause; his entry expired before n1 could take it back.
    n1's forced leave reaches n2 at once: it does not wait for n2's settling read."""
    cl, bob, seen = dan_leaves_in_a_pause()
    back(cl, "n2")
    assert told(bob)[seen:] == []
    back(cl, "n1")
    assert told(bob)[seen:] == [("leave", "dan")]
    for node in ("n1", "n2"):
        cl.bp.reread(node)
    cl.quiesce()
    assert told(bob)[seen:] == [("leave", "dan")]
    cl.check_quiet()


def test_an_expiry_in_a_healthy_cluster_is_a_leave_at_once() -> None:
    """Not after an outage: a node that stopped renewing (killed) has its users leave
    as soon as their entries expire."""
    cl = online_cluster()
    for node in NODES:
        cl.bp.reread(node)
    cl.quiesce()
    cl.connect("n1", "ann", "r1")
    bob = cl.clients[cl.connect("n2", "bob", "r1")]
    cl.quiesce()
    seen = len(told(bob))
    cl.kill("n1")
    cl.bp.drain()
    assert told(bob)[seen:] == [("leave", "ann")]


def test_expiries_held_back_until_the_settling_read_only() -> None:
    """Once settled (its read a TTL after connecting), n2 takes an expiry as a leave:
    a node that stays cut off past its entries' lifetime is partitioned, and its users
    leave (and join again when it is back)."""
    cl = online_cluster()
    cl.connect("n1", "ann", "r1")
    bob = cl.clients[cl.connect("n2", "bob", "r1")]
    cl.quiesce()
    seen = len(told(bob))
    pause(cl)
    back(cl, "n2")
    cl.bp.reread("n2")  # settled: ann's entry expired and n1 is not back
    cl.bp.drain()
    assert told(bob)[seen:] == [("leave", "ann")]
    back(cl, "n1")
    assert told(bob)[seen:] == [("leave", "ann"), ("join", "ann")]


def test_a_node_back_later_drops_at_once_who_left_while_it_was_away() -> None:
    """n1 is back first and takes dan's leave back while n2 is still cut off: n2 never
    gets that record, but its first snapshot names dan among those who left, so it
    does not keep him until it settles."""
    cl, bob, seen = dan_leaves_in_a_pause()
    back(cl, "n1")
    back(cl, "n2")
    assert told(bob)[seen:] == [("leave", "dan")]
    assert cl.brokers["n2"].members("r1") == ["ann", "bob"]
    for node in ("n1", "n2"):
        cl.bp.reread(node)
    cl.quiesce()
    assert told(bob)[seen:] == [("leave", "dan")]
    cl.check_quiet()


def test_a_leave_lost_with_the_link_is_taken_back_at_once_when_the_node_is_back() -> None:
    """dan leaves n1 just as Redis pauses: the leave is lost with the link, and his
    entry expires meanwhile. n1 asks again when it is back, forced (the entry is gone),
    so n2, settling, drops him at once rather than at its settling read."""
    cl = online_cluster()
    cl.connect("n1", "ann", "r1")
    dan = cl.clients[cl.connect("n1", "dan", "r1")]
    bob = cl.clients[cl.connect("n2", "bob", "r1")]
    cl.quiesce()
    seen = len(told(bob))
    cl.disconnect(dan)  # its leave not carried out yet
    pause(cl)
    back(cl, "n2")
    assert told(bob)[seen:] == []
    back(cl, "n1")
    assert told(bob)[seen:] == [("leave", "dan")]
    assert cl.brokers["n2"].members("r1") == ["ann", "bob"]


def test_who_was_there_is_kept_through_two_outages_in_a_row() -> None:
    """n2 loses Redis again before its first snapshot after the pause came: the next
    one still keeps ann and cy (nothing but the settling read lets them go)."""
    cl = online_cluster()
    cl.connect("n1", "ann", "r1")
    bob = cl.clients[cl.connect("n2", "bob", "r1")]
    cl.connect("n3", "cy", "r1")
    cl.quiesce()
    seen = len(told(bob))
    pause(cl)
    cl.restore("n2")
    cl.lose("n2")  # before its snapshot was read
    back(cl, "n2")
    assert told(bob)[seen:] == []
    assert cl.brokers["n2"].members("r1") == ["ann", "bob", "cy"]
