"""Eight ``p2pdeploy join`` processes on loopback: put and get through the CLI, then lose a third.

Republish is made fast with ``join --kademlia KEY=VALUE``: k = 4 (so a value lives on half the
nodes, not all of them), replicas republish every 2 s, publishers every 4 s, an RPC times out
after 2 s. Every process is killed when the test ends; waits poll with generous bounds.
"""

from __future__ import annotations

import trio

from p2pdeploy import api
from p2pdeploy.runtime.control import open_control
from p2pdeploy.runtime.localnet import JoinProcess, open_local_processes, run_p2pdeploy

NODES = 8
K = 4
REPLICATE_INTERVAL_S = 2.0
FAST_REPUBLISH = [
    "--kademlia", f"k={K}",
    "--kademlia", f"replicate_interval_s={REPLICATE_INTERVAL_S}",
    "--kademlia", "republish_interval_s=4",
    "--kademlia", "rpc_timeout_s=2",
]  # fmt: skip
BOUND_S = 60.0
#: Each CLI process spends about a CPU-second importing; eight at once on two cores take long.
CLI_BOUND_S = 120.0
CLI_AT_ONCE = 2


async def cli(limiter: trio.CapacityLimiter, *args: str):
    async with limiter:
        return await run_p2pdeploy(*args, timeout_s=CLI_BOUND_S)


def name_of(index: int) -> str:
    return f"value-{index}"


def value_of(index: int) -> bytes:
    return f"written by node {index}".encode()


async def get_all(nodes: list[JoinProcess], count: int) -> dict[tuple[int, int], bytes | None]:
    """Every value from every node, through each node's control socket (one connection per node)."""
    got: dict[tuple[int, int], bytes | None] = {}

    async def read(reader: JoinProcess) -> None:
        async with open_control(reader.data_dir) as client:
            for index in range(count):
                reply = await client.request(api.GetRequest(api.key_for(name_of(index))))
                got[reader_index[reader.name], index] = None if reply.item is None else reply.item.value

    reader_index = {node.name: int(node.name.split()[-1]) for node in nodes}
    with trio.fail_after(BOUND_S):
        async with trio.open_nursery() as nursery:
            for node in nodes:
                nursery.start_soon(read, node)
    return got


async def stored_items(nodes: list[JoinProcess]) -> int:
    total = 0
    for node in nodes:
        total += (await api.control_request(node.data_dir, api.StatusRequest())).stored_items
    return total


async def test_eight_processes_put_and_get_and_values_survive_killing_a_third(tmp_path):
    limiter = trio.CapacityLimiter(CLI_AT_ONCE)
    async with open_local_processes() as local:
        first = await local.start_join(tmp_path / "n0", name="node 0", extra_args=FAST_REPUBLISH)
        seed = await first.wait_listening()
        nodes = [first]
        for index in range(1, NODES):
            nodes.append(
                await local.start_join(
                    tmp_path / f"n{index}", bootstrap=[seed], name=f"node {index}", extra_args=FAST_REPUBLISH
                )
            )
        for node in nodes:
            await node.wait_for_line(lambda line: line.startswith("overlay joined"))

        # every process puts its value with `p2pdeploy put --data-dir`
        puts = {}

        async def put(index: int) -> None:
            node = nodes[index]
            puts[index] = await cli(limiter, "put", name_of(index), value_of(index).decode(), "--data-dir", str(node.data_dir))

        async with trio.open_nursery() as nursery:
            for index in range(NODES):
                nursery.start_soon(put, index)
        for index, result in puts.items():
            assert result.returncode == 0, result.stdout + result.stderr
            assert result.stdout.decode().startswith(f"stored {name_of(index)} (key "), result.stdout

        # every process gets every value (control socket), and `p2pdeploy get` reads one on each
        assert await get_all(nodes, NODES) == {(r, i): value_of(i) for r in range(NODES) for i in range(NODES)}
        cli_gets = {}

        async def cli_get(index: int) -> None:
            wanted = (index + 1) % NODES
            cli_gets[index] = (wanted, await cli(limiter, "get", name_of(wanted), "--data-dir", str(nodes[index].data_dir)))

        async with trio.open_nursery() as nursery:
            for index in range(NODES):
                nursery.start_soon(cli_get, index)
        for wanted, result in cli_gets.values():
            assert (result.returncode, result.stdout) == (0, value_of(wanted) + b"\n"), result.stderr

        # SIGKILL a third, the seed and two publishers among them: no goodbye, no snapshot at exit
        killed = [nodes[0], nodes[3], nodes[6]]
        for node in killed:
            await node.kill()
        survivors = [node for node in nodes if node not in killed]

        # replicas notice within a replicate interval and store again on the k closest live nodes
        with trio.fail_after(BOUND_S):
            while await stored_items(survivors) < NODES * K:
                await trio.sleep(REPLICATE_INTERVAL_S / 4)
        assert await get_all(survivors, NODES) == {
            (int(node.name.split()[-1]), i): value_of(i) for node in survivors for i in range(NODES)
        }
        result = await cli(limiter, "get", name_of(0), "--data-dir", str(survivors[-1].data_dir))
        assert (result.returncode, result.stdout) == (0, value_of(0) + b"\n"), result.stderr
        for node in survivors:
            assert node.returncode is None, node.transcript()
