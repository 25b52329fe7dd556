"""Real ``p2pdeploy`` processes on loopback: join, ping over UDP and TCP, SIGTERM, identity on disk.

Every process is started with ``sys.executable`` on an OS-chosen 127.0.0.1 port and killed when
its block ends; waits read the processes' output with a generous bound, never a fixed sleep.
"""

from __future__ import annotations

import re
import signal
import stat
import subprocess
import sys

import trio

from p2pdeploy.runtime.address import format_host_port
from p2pdeploy.runtime.localnet import open_local_processes, run_p2pdeploy
from p2pdeploy.runtime.node import open_node

PROCESS_BOUND_S = 30.0


async def run_cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    """Run ``p2pdeploy ARGS`` to completion (killed if it outlives the bound)."""
    with trio.fail_after(PROCESS_BOUND_S):
        return await trio.run_process(
            [sys.executable, "-m", "p2pdeploy.cli", *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


async def test_three_join_processes_join_via_the_first_and_answer_pings_over_udp_and_tcp(tmp_path):
    async with open_local_processes() as local:
        first = await local.start_join(tmp_path / "n1")
        first_address = await first.wait_listening()
        others = [await local.start_join(tmp_path / f"n{i}", bootstrap=[first_address]) for i in (2, 3)]
        for node in others:
            await node.wait_listening()
            await node.wait_for_line(
                lambda line: line.startswith(f"joined via {format_host_port(first_address)}")
            )
            assert node.peers_seen() == {first.node_id_hex: first_address}
        await first.wait_until(lambda n: n.peers_seen() == {o.node_id_hex: o.address for o in others})

        # Between processes: `p2pdeploy ping` from its own process, a small ping and a large one.
        target = others[0]
        udp = await run_cli("ping", format_host_port(target.address), "--count", "2", "--interval", "0")
        tcp = await run_cli(
            "ping",
            format_host_port(target.address),
            "--count",
            "2",
            "--interval",
            "0",
            "--payload-bytes",
            "5000",
        )
        for result, path in ((udp, "udp"), (tcp, "tcp")):
            output = result.stdout.decode()
            assert result.returncode == 0, output + result.stderr.decode()
            pongs = re.findall(
                rf"^pong from {target.node_id_hex} at \S+: seq=\d .* via {path}$", output, re.M
            )
            assert len(pongs) == 2, output

        # And from a node in this process to each of the three, by both paths.
        async with open_node(("127.0.0.1", 0)) as probe:
            for node in [first, *others]:
                for payload in (b"", bytes(3000)):
                    pong = await probe.ping_pong(node.address, payload, timeout_s=PROCESS_BOUND_S)
                    assert f"{pong.node_id:040x}" == node.node_id_hex and pong.rtt_s > 0
            assert probe.counters["udp_received"] == 3 and probe.counters["tcp_received"] == 3

        # SIGTERM (and SIGINT, as from a terminal) stop a node cleanly.
        first.terminate()
        others[0].terminate()
        others[1].process.send_signal(signal.SIGINT)
        for node, name in ((first, "SIGTERM"), (others[0], "SIGTERM"), (others[1], "SIGINT")):
            assert await node.wait_exit() == 0, node.transcript()
            assert node.stdout_lines[-2:] == [f"stopping on {name}", "stopped"], node.transcript()
            assert node.stderr_lines == [], node.transcript()


async def test_a_restarted_node_keeps_its_id_and_its_key_file_is_private(tmp_path):
    data_dir = tmp_path / "node"
    async with open_local_processes() as local:
        node = await local.start_join(data_dir)
        await node.wait_listening()
        first_id = node.node_id_hex
        assert any(line.startswith("identity created in") for line in node.stdout_lines)
        node.terminate()
        assert await node.wait_exit() == 0

        again = await local.start_join(data_dir)
        await again.wait_listening()
        assert again.node_id_hex == first_id
        assert any(line.startswith("identity loaded from") for line in again.stdout_lines)
        again.terminate()
        assert await again.wait_exit() == 0
    assert stat.S_IMODE((data_dir / "identity.key").stat().st_mode) == 0o600


async def test_join_hands_off_what_it_holds_on_sigterm_and_a_second_signal_skips_it(tmp_path):
    """A node holding blob chunks hands them on when it stops; when its only peer has been killed
    the hand-off waits for answers that never come, and a second SIGTERM ends it at once."""
    data = tmp_path / "data.bin"
    data.write_bytes(bytes(range(256)) * 2000)  # 512,000 bytes: two chunks and a manifest
    async with open_local_processes() as local:
        first = await local.start_join(tmp_path / "a", name="a")
        seed = await first.wait_listening()
        second = await local.start_join(tmp_path / "b", bootstrap=[seed], name="b")
        await second.wait_listening()
        for node in (first, second):
            await node.wait_for_line(lambda line: line.startswith("overlay joined"))
        stored = await run_p2pdeploy("blob", "put", str(data), "--data-dir", str(tmp_path / "b"), timeout_s=120)
        assert stored.returncode == 0, stored.stdout + stored.stderr
        assert b"2 copies of each" in stored.stdout  # both nodes hold every key

        await first.kill()  # no goodbye: b still believes in it
        second.terminate()
        said = await second.wait_for_line(lambda line: line.startswith("handing "))
        assert said.startswith("handing 3 stored keys to the nodes now closest")
        second.terminate()
        await second.wait_for_line(lambda line: line == "SIGTERM again: leaving without handing off")
        assert await second.wait_exit() == 0
        assert second.stdout_lines[-1] == "stopped"
