"""How ``roombus serve`` merges flags, variables and the configuration file (no process)."""

from __future__ import annotations

import re
from importlib import resources

import pytest

from roombus import ConfigError, RoomName
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


def test_history_settings_from_flag_variable_and_file(tmp_path):
    toml = "history-size = 50\nhistory-ttl = 120\ndedup-window = 60\n"
    s = settings(
        tmp_path,
        toml,
        "--history-size",
        "20",
        "--recovery-max",
        "10",
        env={"ROOMBUS_HISTORY_MAX_BYTES": "1000000", "ROOMBUS_POSITION_TTL": "600"},
    )
    b = s.broker
    assert (b.history_size, b.history_ttl, b.dedup_window) == (20, 120.0, 60.0)
    assert (b.history_max_bytes, b.position_ttl, b.recovery_max) == (1_000_000, 600.0, 10)


def test_recovery_max_over_the_send_queue_is_a_configuration_error(tmp_path):
    with pytest.raises(ConfigError, match="recovery-max: must be at most send-queue"):
        settings(tmp_path, "", "--send-queue", "50", "--recovery-max", "51")


def test_room_tables_override_history_per_pattern(tmp_path):
    toml = (
        "history-size = 30\nhistory-ttl = 90\n"
        '[rooms."tenant-*"]\nhistory-size = 1000\n'
        '[rooms."quiet"]\nhistory-size = 0\nhistory-ttl = 5\n'
    )
    s = settings(tmp_path, toml)
    policies = {pattern: (p.size, p.ttl) for pattern, p in s.broker.room_history}
    # A missing key is the server-wide value.
    assert policies == {"tenant-*": (1000, 90.0), "quiet": (0, 5.0)}
    from roombus.lowlevel import Broker

    streams = Broker(s.broker).streams
    assert streams.policy(RoomName("tenant-7")).size == 1000
    assert streams.policy(RoomName("lobby")).size == 30


@pytest.mark.parametrize(
    ("toml", "where"),
    [
        ('[rooms."t-*"]\nhistory-size = -1\n', 'rooms."t-*".history-size'),
        ('[rooms."t-*"]\nhistory-ttl = 0\n', 'rooms."t-*".history-ttl'),
        ('[rooms."t-*"]\nsize = 3\n', 'rooms."t-*".size: unknown setting'),
        ("rooms = 3\n", "rooms: must be tables"),
        ('[rooms]\n"t-*" = 3\n', 'rooms."t-*": must be a table'),
    ],
)
def test_bad_room_tables_are_named(tmp_path, toml, where):
    with pytest.raises(ConfigError, match=re.escape(where)):
        settings(tmp_path, toml)


def test_the_javascript_client_is_served_unless_no_script(tmp_path):
    body = resources.files("roombus").joinpath("js/roombus.js").read_bytes()
    script = settings(tmp_path, "").server.script
    assert script is not None
    assert (script.body, script.content_type) == (body, b"text/javascript; charset=utf-8")
    assert re.fullmatch(rb'"[0-9a-f]{16}"', script.etag)
    assert settings(tmp_path, "", "--no-script").server.script is None
    assert settings(tmp_path, "no-script = true\n").server.script is None
    assert settings(tmp_path, "", env={"ROOMBUS_NO_SCRIPT": "1"}).server.script is None
    off_in_file = settings(tmp_path, "no-script = true\n", env={"ROOMBUS_NO_SCRIPT": "0"})
    assert off_in_file.server.script == script  # the variable beats the file


def test_proxy_options_from_flag_variable_and_file(tmp_path):
    default = settings(tmp_path, "")
    assert not default.server.forwarded_allow_ips  # trust nothing
    assert default.server.proxy_protocol is False
    s = settings(
        tmp_path,
        'forwarded-allow-ips = ["10.0.0.0/8", "127.0.0.1"]\nproxy-protocol = true\n',
    )
    assert s.server.forwarded_allow_ips.entries == ["10.0.0.0/8", "127.0.0.1/32"]
    assert s.server.proxy_protocol is True
    s = settings(
        tmp_path,
        'forwarded-allow-ips = "10.0.0.1"\n',
        "--forwarded-allow-ips",
        "127.0.0.1, ::1",
        "--forwarded-allow-ips",
        "fd00::/8",
        "--proxy-protocol",
    )
    assert s.server.forwarded_allow_ips.entries == ["127.0.0.1/32", "::1/128", "fd00::/8"]
    assert s.server.proxy_protocol is True
    s = settings(
        tmp_path,
        "",
        env={"ROOMBUS_FORWARDED_ALLOW_IPS": "*", "ROOMBUS_PROXY_PROTOCOL": "1"},
    )
    assert s.server.forwarded_allow_ips.any and s.server.proxy_protocol


@pytest.mark.parametrize(
    ("toml", "args", "env", "message"),
    [
        ("", ["--forwarded-allow-ips", "127.0.0.1,10.0.0.300"], {}, "--forwarded-allow-ips"),
        ("", [], {"ROOMBUS_FORWARDED_ALLOW_IPS": "nginx"}, "ROOMBUS_FORWARDED_ALLOW_IPS"),
        ('forwarded-allow-ips = ["10.0.0.1/8"]\n', [], {}, "forwarded-allow-ips"),
        ("", [], {"ROOMBUS_PROXY_PROTOCOL": "maybe"}, "ROOMBUS_PROXY_PROTOCOL"),
    ],
)
def test_a_bad_trusted_address_is_one_line_naming_where(tmp_path, toml, args, env, message):
    with pytest.raises(ConfigError) as info:
        settings(tmp_path, toml, *args, env=env)
    text = str(info.value)
    assert message in text and "\n" not in text
    if "PROXY_PROTOCOL" not in message:
        assert "is not an IP address, a CIDR network or *" in text


def test_the_drain_window_from_flag_variable_and_file(tmp_path):
    assert settings(tmp_path, "").server.drain_seconds == 10.0
    assert settings(tmp_path, "drain-seconds = 3\n").server.drain_seconds == 3.0
    s = settings(tmp_path, "drain-seconds = 3\n", env={"ROOMBUS_DRAIN_SECONDS": "2.5"})
    assert s.server.drain_seconds == 2.5
    s = settings(tmp_path, "", "--drain-seconds", "0", env={"ROOMBUS_DRAIN_SECONDS": "2.5"})
    assert s.server.drain_seconds == 0.0


@pytest.mark.parametrize("value", ["-1", "inf", "nan", "soon"])
def test_a_negative_or_odd_drain_window_is_refused(tmp_path, value):
    with pytest.raises(ConfigError, match="drain-seconds") as info:
        settings(tmp_path, "", "--drain-seconds", value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("port = true\n", "port: must be a number, not true"),
        ("api-port = false\n", "api-port: must be a number, not false"),
        ("rate-limit = true\n", "rate-limit: must be a number, not true"),
        ("max-connections = false\n", "max-connections: must be a number, not false"),
        ("history-ttl = true\n", "history-ttl: must be a number, not true"),
        ("host = true\n", "host: must be a string, not true"),
        ("allowed-origin = [true]\n", "allowed-origin: must be a string, not true"),
        ("jwt-secret = true\n", "jwt-secret: must be a string"),
    ],
)
def test_a_boolean_in_the_file_is_no_number(tmp_path, toml, message):
    # bool is an int in Python: `port = true` would listen on port 1.
    with pytest.raises(ConfigError) as info:
        settings(tmp_path, toml)
    assert str(info.value) == f"{tmp_path / 'roombus.toml'}: {message}"


def test_a_boolean_switch_and_numbers_in_the_file_still_work(tmp_path):
    s = settings(tmp_path, "no-page = true\nport = 9000\nrate-limit = 2.5\nmax-connections = 0\n")
    assert s.server.page is None and s.server.port == 9000
    assert s.broker.rate_limit == 2.5 and s.server.max_connections == 0


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("port = 70000\n", "port: must be 0-65535, not 70000"),
        ("port = -1\n", "port: must be 0-65535, not -1"),
        ("rate-limit = -1\n", "rate-limit: "),
        ("max-connections = -5\n", "max-connections: "),
    ],
)
def test_a_range_error_from_the_file_names_the_file(tmp_path, toml, message):
    with pytest.raises(ConfigError) as info:
        settings(tmp_path, toml)
    assert str(info.value).startswith(f"{tmp_path / 'roombus.toml'}: {message}"), info.value


def test_a_range_error_from_a_flag_or_variable_names_the_setting(tmp_path):
    with pytest.raises(ConfigError, match=r"^port: must be 0-65535, not 70000$"):
        settings(tmp_path, "port = 1\n", "--port", "70000")
    with pytest.raises(ConfigError, match=r"^port: must be 0-65535, not 70000$"):
        settings(tmp_path, "", env={"ROOMBUS_PORT": "70000"})


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--port", "abc"], {}, "--port: 'abc' is not a port (0-65535)"),
        (["--api-port", "8x"], {}, "--api-port: '8x' is not a port (0-65535)"),
        ([], {"ROOMBUS_PORT": "abc"}, "ROOMBUS_PORT: 'abc' is not a port (0-65535)"),
        ([], {}, "{file}: port: 'abc' is not a port (0-65535)"),
    ],
)
def test_a_port_that_is_no_number_says_what_a_port_is(tmp_path, args, env, message):
    toml = "" if args or env else 'port = "abc"\n'
    with pytest.raises(ConfigError) as info:
        settings(tmp_path, toml, *args, env=env)
    assert str(info.value) == message.format(file=tmp_path / "roombus.toml")


def test_the_startup_line_has_the_page_url_when_a_page_is_served(tmp_path):
    from roombus._run import _url

    assert _url(settings(tmp_path, ""), 8765) == (
        "ws://127.0.0.1:8765/ws, page at http://127.0.0.1:8765/"
    )
    # The WebSocket URL first, as the tests and tools that read the line expect.
    assert _url(settings(tmp_path, "", "--no-page"), 8765) == "ws://127.0.0.1:8765/ws"
