"""Puts on a loopback community before and after a flood of forged senders, with and without
contact verification.

``--nodes`` ``p2pdeploy join`` processes (k = 3) join through the first. One node puts ``--puts``
values (timed through its control socket); then a socket sends it ``--flood`` Kademlia probes,
each under a random sender id, and it puts as many values again. With contact verification (a
real node's default) no forged sender enters its routing table; without it
(``--kademlia verify_contacts=false``) each one may, and every lookup then waits on them.

    python benchmarks/bench_contact_flood.py [--nodes 4] [--puts 20] [--flood 2000]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import trio
from rich.console import Console
from rich.table import Table

from p2pdeploy import api, wire
from p2pdeploy.overlay.kademlia import Probe
from p2pdeploy.overlay.storage import Item
from p2pdeploy.runtime.detector_trials import start_community
from p2pdeploy.runtime.localnet import open_local_processes


async def trial(verify: bool, nodes: int, puts: int, flood: int) -> dict[str, float]:
    args = ["--kademlia", "k=3", "--kademlia", "rpc_timeout_s=2", "--kademlia", f"verify_contacts={str(verify).lower()}"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        async with open_local_processes() as local:
            community = await start_community(local, root, nodes, extra_args=args)
            for node in community:
                await node.wait_for_line(lambda line: line.startswith("overlay joined"))
            target = community[1]
            with trio.fail_after(60):
                while (await api.control_request(target.data_dir, api.StatusRequest())).contacts < nodes - 1:
                    await trio.sleep(0.1)

            async def timed_puts(tag: str) -> tuple[float, int]:
                took, reached = [], []
                for index in range(puts):
                    start = time.perf_counter()
                    reply = await api.control_request(target.data_dir,
                                                      api.PutRequest(api.key_for(f"{tag}-{index}"), Item(b"x")))
                    took.append((time.perf_counter() - start) * 1000)
                    reached.append(reply.stored)
                return statistics.median(took), min(reached)

            before = await timed_puts("before")
            sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
            with sock:
                await sock.bind(("127.0.0.1", 0))
                forged = random.Random(11)
                for rpc_id in range(1, flood + 1):
                    await sock.sendto(wire.encode(Probe(rpc_id, forged.getrandbits(160))), target.address)
            await trio.sleep(0.5)
            after = await timed_puts("after")
            contacts = (await api.control_request(target.data_dir, api.StatusRequest())).contacts
    return {"before_ms": before[0], "after_ms": after[0], "reached": after[1], "contacts": contacts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--puts", type=int, default=20)
    parser.add_argument("--flood", type=int, default=2000)
    options = parser.parse_args()
    table = Table(title=f"{options.nodes} nodes (k = 3), {options.flood} forged probes at one of them")
    for column in ("contact verification", "put median before (ms)", "put median after (ms)",
                   "fewest nodes a put reached after", "contacts after"):
        table.add_column(column, justify="right")
    for verify in (True, False):
        result = trio.run(trial, verify, options.nodes, options.puts, options.flood)
        table.add_row("on (default)" if verify else "off", f"{result['before_ms']:.1f}", f"{result['after_ms']:.1f}",
                      str(result["reached"]), str(result["contacts"]))
    Console().print(table)


if __name__ == "__main__":
    main()
