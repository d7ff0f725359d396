"""
The chat page in a real browser (headless Chromium), on roombus.js, against real
servers in subprocesses: two people chat and see each other online; the server is
restarted (single node, over each transport), or the node a page is on is killed with
SIGKILL (a two-node cluster behind Redis), while a third client (the Python client)
publishes numbered messages; one page types a message while it is offline. At the end
both pages show every message exactly once and in the same order, the offline message
was delivered once and is no longer pending, and a page that could not recover a range
says so. Each page's final state is kept as a screenshot (see ``conftest.py``).

Pages and the publisher reach the servers through a :class:`~.conftest.Link` each (a
loopback TCP proxy): the cluster's load balancer, or the address that stays when a
server restarts; holding a page's link is that page being offline.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import pytest

from .cdp import HOST
from .conftest import ChatPage, Link, Node, Publisher, artifact_name, cluster_node

ROOT = Path(__file__).resolve().parents[2]

OFFLINE_TEXT = "typed while offline ✈"


def check_stream(page: ChatPage, expected_pub: list[str]) -> list[tuple[str, str]]:
    """*page* shows each message once, in stream order, with the publisher's in order."""
    shown = page.messages()
    texts = [(m["username"], m["text"]) for m in shown]
    assert len(set(texts)) == len(texts), f"{page.username} shows a message twice: {texts}"
    assert [t for u, t in texts if u == "pub"] == expected_pub, f"{page.username}: {texts}"
    # Within an epoch the seqs go up one by one; an epoch, once left, never comes back.
    epochs: list[str] = []
    last: dict[str, int] = {}
    for m in shown:
        assert m["room"] == page.room and m["epoch"] and m["seq"] is not None, m
        if not epochs or epochs[-1] != m["epoch"]:
            assert m["epoch"] not in epochs, f"{page.username}: back to an old epoch: {shown}"
            epochs.append(m["epoch"])
        else:
            assert m["seq"] == last[m["epoch"]] + 1, f"{page.username}: a gap at {m}: {shown}"
        last[m["epoch"]] = m["seq"]
    return texts


def all_published(sent: list[str]) -> Callable[[dict[str, object]], bool]:
    want = set(sent)

    def done(snap: dict[str, object]) -> bool:
        items = snap["items"]
        assert isinstance(items, list)
        got = {i["text"] for i in items if i["kind"] == "message" and i["username"] == "pub"}
        return want <= got and not snap["outbox"]

    return done


def chat_and_see_each_other(ann: ChatPage, bob: ChatPage) -> None:
    for page in (ann, bob):
        page.wait_state("online")
        page.wait_people("ann", "bob")
    ann.say("Hi Bob! Ça va ?")
    bob.wait_message("ann", "Hi Bob! Ça va ?")
    bob.say("Hello Ann, good to see you here.")
    ann.wait_message("bob", "Hello Ann, good to see you here.")


def go_offline_and_type(page: ChatPage, shots: Path, name: str) -> None:
    """*page* is offline (its link held): what it types waits, greyed, as sending."""
    snap = page.wait_for(
        lambda s: s["state"] == "reconnecting", "reconnecting (its server is gone)"
    )
    assert re.fullmatch(r"reconnecting( in \d+ s|…)", snap["pill"]), snap["pill"]
    page.say(OFFLINE_TEXT)
    snap = page.wait_for(lambda s: len(s["outbox"]) == 1, "showing the message as pending")
    assert snap["outbox"] == [{"status": "sending", "text": OFFLINE_TEXT, "greyed": True}]
    page.tab.screenshot(shots / name)


def back_online(page: ChatPage) -> None:
    """The link is back: the page connects (at once: its Retry button) and sends."""
    snap = page.snapshot()
    if snap["state"] == "reconnecting":
        page.tab.click("#retry")
    page.wait_for(
        lambda s: s["state"] == "online" and not s["outbox"], "online with nothing pending"
    )


@pytest.mark.parametrize("transport", ["trio", "asyncio", "uvicorn"])
def test_a_server_restart_while_someone_publishes_loses_nothing(
    transport: str,
    servers: Callable[..., Node],
    links: Callable[[int], Link],
    pages: Callable[..., ChatPage],
    publishers: Callable[[int], Publisher],
    artifacts: Path,
    request: pytest.FixtureRequest,
) -> None:
    t0 = time.monotonic()
    first = servers(transport)
    ann_link, bob_link, pub_link = links(first.port), links(first.port), links(first.port)
    ann = pages(ann_link, "ann")
    bob = pages(bob_link, "bob", width=420, height=760)  # a phone's width
    chat_and_see_each_other(ann, bob)

    pub = publishers(pub_link.port)
    for page in (ann, bob):
        page.wait_people("ann", "bob", "pub")
        page.wait_message("pub", "pub #5")
    second = servers(transport)  # the restart's new process, while pub goes on
    for link in (ann_link, bob_link, pub_link):
        link.target = second.port
    # A single server starts a new stream when it restarts: what is published there
    # before a page is back is not replayed to it (it is told: epoch_changed). So ann
    # and the publisher stay off until bob is back, and the publisher until ann is.
    ann_link.hold()
    pub_link.hold()
    first.stop()  # SIGTERM: everyone is told (1001), after what was queued for them

    bob.wait_for(lambda s: s["state"] == "online" and s["joins"] >= 2, "back on the new server")
    go_offline_and_type(ann, artifacts, artifact_name(request, "ann-offline"))
    ann_link.release()
    back_online(ann)
    bob.wait_message("ann", OFFLINE_TEXT)
    pub_link.release()
    time.sleep(1.0)  # the publisher catches up, then publishes live for a while
    sent = pub.stop()
    assert len(sent) >= 15

    for page in (ann, bob):
        page.wait_for(all_published(sent), "showing everything published")
    texts = check_stream(ann, sent)
    assert check_stream(bob, sent) == texts
    assert texts[:2] == [("ann", "Hi Bob! Ça va ?"), ("bob", "Hello Ann, good to see you here.")]
    assert texts.count(("ann", OFFLINE_TEXT)) == 1
    for page in (ann, bob):
        notes = page.notes()
        assert [(n["note"], n["reason"]) for n in notes] == [("joined", "epoch_changed")], notes
        assert page.snapshot()["people"] == ["ann", "bob"]  # the publisher is gone
    print(f"{transport}: {len(sent)} published, {time.monotonic() - t0:.1f} s")


def test_a_cluster_node_killed_under_a_page_loses_nothing(
    servers: Callable[..., Node],
    redis: object,
    links: Callable[[int], Link],
    pages: Callable[..., ChatPage],
    publishers: Callable[[int], Publisher],
    artifacts: Path,
    request: pytest.FixtureRequest,
) -> None:
    t0 = time.monotonic()
    node0, node1 = cluster_node(servers, redis, 0), cluster_node(servers, redis, 1)  # type: ignore[arg-type]
    ann_link, bob_link, pub_link = links(node0.port), links(node1.port), links(node1.port)
    ann = pages(ann_link, "ann")  # on node 0 (trio)
    bob = pages(bob_link, "bob")  # on node 1 (asyncio)
    chat_and_see_each_other(ann, bob)

    pub = publishers(pub_link.port)
    for page in (ann, bob):
        page.wait_people("ann", "bob", "pub")
        page.wait_message("pub", "pub #5")
    ann_link.hold()
    ann_link.target = node1.port  # the balancer sends ann to the node that is left
    node0.kill()  # SIGKILL: ann's connection breaks without a close frame
    go_offline_and_type(ann, artifacts, artifact_name(request, "ann-offline"))
    ann_link.release()
    back_online(ann)
    bob.wait_message("ann", OFFLINE_TEXT)

    # A reload resumes from the tab's positions and shows what it showed before.
    bob.reload()
    bob.wait_state("online")
    time.sleep(1.0)
    sent = pub.stop()
    for page in (ann, bob):
        page.wait_for(all_published(sent), "showing everything published")
    texts = check_stream(ann, sent)
    assert check_stream(bob, sent) == texts
    assert texts.count(("ann", OFFLINE_TEXT)) == 1
    assert ann.notes() == []  # everything was recovered
    assert [n["note"] for n in bob.notes()] == ["restored"]  # the reload said what it showed
    print(f"cluster: {len(sent)} published, {time.monotonic() - t0:.1f} s")


def test_without_autoconnect_the_page_asks_for_a_room_and_a_name(
    servers: Callable[..., Node],
    links: Callable[[int], Link],
    pages: Callable[..., ChatPage],
    artifacts: Path,
    request: pytest.FixtureRequest,
) -> None:
    link = links(servers("trio").port)
    cy = pages(link, "cy", width=420, height=760, load=False)
    cy.tab.goto(f"http://{HOST}:{link.port}/?room=garden")
    cy.tab.wait("document.body?.dataset.view === 'join'", "showing the join form")
    assert cy.tab.js("document.getElementById('room').value") == "garden"
    assert cy.tab.js("document.getElementById('username').value").startswith("guest")
    cy.tab.screenshot(artifacts / artifact_name(request, "join-form"))
    cy.tab.js("document.getElementById('room').select()")
    cy.tab.type("lobby")
    cy.tab.js("document.getElementById('username').select()")
    cy.tab.type("cy")
    cy.tab.click("#join")
    cy.tab.wait("document.body?.dataset.view === 'chat'", "showing the chat")
    assert "autoconnect=1" in cy.tab.js("location.search")
    cy.wait_state("online")
    cy.wait_people("cy")
    cy.say("first!")
    cy.wait_for(lambda s: cy.texts(s) == [("cy", "first!")] and not s["outbox"], "sent")


def test_the_example_page_is_the_bundled_page() -> None:
    bundled = resources.files("roombus").joinpath("_static/chat.html").read_bytes()
    assert (ROOT / "examples" / "chat.html").read_bytes() == bundled
