"""Run one replica of a service directory on this machine until Ctrl-C.

    python examples/run_local.py examples/hello

It packs the directory into a bundle, starts it with the node's supervisor and real executor
(limits, health checks, restarts, rotating logs) and prints its state changes. Nothing joins a
network: this is the fabric layer alone.
"""

import signal
import sys
import tempfile
from pathlib import Path

import trio

from p2pdeploy.fabric.contribution import ANY, Contribution
from p2pdeploy.fabric.supervisor import ReplicaState, ReplicaStateChanged
from p2pdeploy.runtime.bundlefile import bundle_from_directory
from p2pdeploy.runtime.exec_local import open_local_replicas
from p2pdeploy.runtime.probe import probe_machine


async def main(directory: str) -> None:
    bundle = bundle_from_directory(directory)
    manifest = bundle.manifest
    data_dir = Path(tempfile.mkdtemp(prefix="p2pdeploy-local-", dir="/tmp"))
    data_dir.chmod(0o755)
    contribution = Contribution.from_table({"cpu": "100%", "memory": "50%", "trusted_keys": ANY}, probe_machine(data_dir))
    async with open_local_replicas(data_dir, contribution) as local:
        replica_id = f"{manifest.name}-1"
        refusal = local.command(
            lambda core, now: local.host.start_replica(
                manifest.replica_spec(replica_id), manifest.demand(), now, bundle=bundle.data
            )
        )
        if refusal is not None:
            sys.exit(f"refused: {refusal}")
        print(f"{replica_id}: files and logs in {data_dir / 'replicas' / replica_id}")
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(print_states, local, replica_id)
                async for _ in signals:
                    break
                nursery.cancel_scope.cancel()
        local.command(lambda core, now: local.host.stop_replica(replica_id, now))
        await local.wait_for_state(replica_id, ReplicaState.STOPPED, timeout_s=manifest.stop_grace_s + 5)
        print(local.host.status(replica_id))


async def print_states(local, replica_id: str) -> None:
    seen = 0
    while True:
        for event in local.events[seen:]:
            if isinstance(event, ReplicaStateChanged):
                status = local.host.status(replica_id)
                port = f" (port {status.port})" if status and status.port else ""
                print(f"{event}{port}", flush=True)
        seen = len(local.events)
        await trio.sleep(0.2)

if __name__ == "__main__":
    trio.run(main, sys.argv[1] if len(sys.argv) > 1 else "examples/hello")
