"""
``roombus serve --redis rediss://...``: two nodes (trio and asyncio), each its own
process, through a Redis that speaks TLS only and requires a client certificate
(``redis-server --port 0 --tls-port P --tls-auth-clients yes``, certificates by
trustme). Loopback only.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import Client, CliServer, open_client
from tests.e2e.test_cluster_nodes import drain, metric, wait_for
from tests.redis.conftest import RedisProcess, TLSFiles, start_tls_redis


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    return TLSFiles(tmp_path_factory.mktemp("redis-tls-e2e"))


@pytest.fixture
def mtls_redis(tls_files: TLSFiles) -> Iterator[RedisProcess]:
    server = start_tls_redis(tls_files, auth_clients=True)
    try:
        yield server
    finally:
        server.close()


def test_a_trio_node_and_an_asyncio_node_chat_over_tls(
    mtls_redis: RedisProcess, tls_files: TLSFiles
) -> None:
    assert mtls_redis.url.startswith("rediss://")
    nodes = [
        # the options on the command line ...
        CliServer(
            "--port",
            "0",
            "--redis",
            mtls_redis.url,
            "--redis-ca",
            tls_files.ca_file,
            "--redis-cert",
            tls_files.client_cert,
            "--redis-key",
            tls_files.client_key,
            "--redis-server-name",
            "redis.test",
            "--node-id",
            "tls-trio",
            transport="trio",
        ),
        # ... and in their variables
        CliServer(
            "--port",
            "0",
            "--node-id",
            "tls-asyncio",
            env={
                "ROOMBUS_REDIS": mtls_redis.url,
                "ROOMBUS_REDIS_CA": tls_files.ca_file,
                "ROOMBUS_REDIS_CERT": tls_files.client_pem,
            },
            transport="asyncio",
        ),
    ]
    clients: list[Client] = []
    try:
        for node in nodes:
            node.wait_listening()
            wait_for(lambda node=node: metric(node, "roombus_backplane_online") == 1)
        on_trio, on_asyncio = nodes
        ann = open_client(on_trio.port, "lobby", "ann")
        clients.append(ann)
        bob = open_client(on_asyncio.port, "lobby", "bob", expect_join=None)
        clients.append(bob)
        bob.expect(type="presence", event="join", username="bob")
        assert bob.expect(type="presence_state")["users"] == ["ann", "bob"]
        ann.expect(type="presence", event="join", username="bob")
        for k in range(20):
            ann.chat(f"a{k}")
            bob.chat(f"b{k}")
        orders = []
        for client in (ann, bob):
            chats = drain(client, until=lambda m: m.get("seq") == 40)
            orders.append([(m["username"], m["content"], m["seq"]) for m in chats])
            assert [m[2] for m in orders[-1]] == list(range(1, 41))
        assert orders[0] == orders[1]
        for node in nodes:
            assert "Traceback" not in node.stderr
            assert metric(node, "roombus_redis_failures_total") == 0
    finally:
        for client in clients:
            client.close()
        for node in nodes:
            node.stop()


@pytest.mark.parametrize("transport", ["trio", "asyncio"])
def test_a_node_that_cannot_verify_redis_serves_alone_and_keeps_trying(
    mtls_redis: RedisProcess, tls_files: TLSFiles, transport: str
) -> None:
    node = CliServer(
        "--port",
        "0",
        "--redis",
        mtls_redis.url,
        "--redis-ca",
        tls_files.other_ca_file,
        "--redis-cert",
        tls_files.client_pem,
        transport=transport,
    )
    try:
        node.wait_listening()
        wait_for(lambda: (metric(node, "roombus_redis_failures_total") or 0) >= 3)
        assert metric(node, "roombus_backplane_online") == 0
        ann = open_client(node.port, "lobby", "ann")  # served locally meanwhile
        ann.chat("alone")
        ann.expect_chat("alone", "ann")
        ann.close()
        time.sleep(0.2)
        lines = [line for line in node.lines if "not trusted" in line]
        assert len(lines) >= 3, node.stderr
        assert "Traceback" not in node.stderr
    finally:
        node.stop()


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (("--redis", "redis://127.0.0.1:1", "--redis-ca", "ca.pem"), "redis-ca: needs a rediss://"),
        (("--redis-cert", "c.pem"), "redis-cert: needs --redis"),
        (("--redis", "rediss://127.0.0.1:1", "--redis-ca", "/nonexistent.pem"), "redis-ca: cannot"),
        (("--redis", "rediss://127.0.0.1:1", "--redis-key", "k.pem"), "redis-key: needs --redis-c"),
    ],
)
def test_tls_option_errors_exit_2_in_one_line(
    args: tuple[str, ...], error: str, tmp_path: Path
) -> None:
    node = CliServer("--port", "0", *args)
    try:
        assert node.wait(15) == 2
        assert error in node.stderr
        assert "Traceback" not in node.stderr
        assert len(node.stderr.strip().splitlines()) == 1, node.stderr
    finally:
        node.stop()
