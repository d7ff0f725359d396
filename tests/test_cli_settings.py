"""How ``roombus serve`` merges flags, variables and the configuration file (no process)."""

from __future__ import annotations

import pytest

from roombus import ConfigError
from roombus._cli import _parser
from roombus.node.options import build_configs


def settings(tmp_path, toml: str, *args: str, env: dict[str, str] | None = None):
    path = tmp_path / "roombus.toml"
    path.write_text(toml)
    return build_configs(_parser().parse_args(["serve", "--config", str(path), *args]), env or {})


def test_an_empty_variable_does_not_undo_the_file(tmp_path):
    s = settings(
        tmp_path,
        'allowed-origin = ["https://chat.example.com"]\nno-metrics = true\n',
        env={"ROOMBUS_ALLOWED_ORIGIN": "", "ROOMBUS_NO_METRICS": " "},
    )
    assert s.server.allowed_origins == frozenset({"https://chat.example.com"})
    assert s.server.metrics is False


def test_flag_beats_variable_beats_file(tmp_path):
    toml = "max-message-bytes = 1000\nsend-queue = 7\nrate-burst = 9\n"
    s = settings(tmp_path, toml, "--max-message-bytes", "3000", env={"ROOMBUS_SEND_QUEUE": "8"})
    assert (s.broker.max_message_bytes, s.broker.send_queue, s.broker.rate_burst) == (3000, 8, 9)


@pytest.mark.parametrize(
    ("toml", "secret"),
    [
        ('jwt-secret = ["topsecret-topsecret-topsecret-42"]\n', "topsecret-topsecret"),
        ('redis = {url = "redis://:hunter2@127.0.0.1"}\n', "hunter2"),
    ],
)
def test_errors_never_echo_secrets(tmp_path, toml, secret):
    with pytest.raises(ConfigError) as info:
        settings(tmp_path, toml)
    assert secret not in str(info.value)


def test_keys_outside_the_roombus_table_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="outside the \\[roombus\\] table"):
        settings(tmp_path, "port = 1\n[roombus]\nport = 2\n")


def test_the_queued_bytes_budget_and_send_buffer_from_flag_variable_and_file(tmp_path):
    s = settings(
        tmp_path,
        "max-queued-bytes = 1000000\nsocket-send-buffer = 4096\n",
        "--max-queued-bytes",
        "2000000",
        env={"ROOMBUS_SOCKET_SEND_BUFFER": "16384"},
    )
    assert (s.server.max_queued_bytes, s.server.socket_send_buffer) == (2_000_000, 16384)
    s = settings(tmp_path, "")
    assert (s.server.max_queued_bytes, s.server.socket_send_buffer) == (256 << 20, 64 << 10)


@pytest.mark.parametrize("flag", ["--max-queued-bytes", "--socket-send-buffer"])
def test_a_negative_budget_or_buffer_is_refused(tmp_path, flag):
    with pytest.raises(ConfigError, match=flag[2:]):
        settings(tmp_path, "", flag, "-1")
