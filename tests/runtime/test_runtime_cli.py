"""The ``join`` and ``ping`` commands' options and errors, and ``make demo`` end to end."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import pytest
from click.testing import CliRunner

from p2pdeploy.cli import main


@pytest.mark.parametrize(
    ("args", "option", "complaint"),
    [
        (["join", "--listen", "nowhere"], "'--listen'", "has no port"),
        (["join", "--bootstrap", "127.0.0.1:0"], "'--bootstrap'", "between 1 and 65535"),
        (["join", "--bootstrap", "127.0.0.1:x"], "'--bootstrap'", "must be a number"),
        (["ping", "localhost"], "'HOST:PORT'", "has no port"),
        (["ping", "127.0.0.1:7400", "--listen", ":1"], "'--listen'", "has no host"),
    ],
)
def test_a_bad_host_port_is_a_usage_error_naming_its_option(args, option, complaint):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert f"Invalid value for {option}" in result.output and complaint in result.output


def test_join_refuses_a_key_file_others_can_read(tmp_path):
    key = tmp_path / "identity.key"
    key.write_bytes(bytes(32))
    key.chmod(0o644)
    result = CliRunner().invoke(main, ["join", "--data-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "chmod 600" in result.output


def test_ping_exits_1_when_no_pong_comes_back():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        host, port = silent.getsockname()
        result = CliRunner().invoke(main, ["ping", f"{host}:{port}", "--count", "1", "--timeout", "0.05"])
    assert result.exit_code == 1, result.output
    assert "seq=1 timed out" in result.output and "1 pings, 0 pongs, 1 lost" in result.output


def test_the_demo_runs_every_step_and_stops_every_node():
    env = {**os.environ, "COLUMNS": "200"}
    result = subprocess.run(
        [sys.executable, "-m", "p2pdeploy.demo", "--nodes", "3"],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"all \d+ steps worked", result.stdout)
    assert "every node stopped cleanly" in result.stdout
    assert "count 2 (version 2)" in result.stdout  # the service's counter in the state API
    assert re.search(r"the replacement ran healthy [\d.]+ s after the kill", result.stdout)
    assert "count 3 (version 3)" in result.stdout  # the replacement counts on from its predecessor's state
    assert "(byte-identical)" in result.stdout  # the blob fetched on another node
