"""The fabric layer: what an owner contributes and how a service process is run on it.

- ``units``: sizes (``512M``), cores, bandwidth, shares of the machine.
- ``machine``: the facts a probe found about a machine.
- ``contribution``: the owner's contribution (config file section or ``join`` flags), trust.
- ``admission``: the ledger of reservations; refusals that say which resource and by how much.
- ``executor``: the executor contract (commands, reports, specs) both executors implement.
- ``supervisor``: one replica's states, health checks, restarts and stop sequence (sans-I/O).
- ``replicas``: the node's replicas as one core layer (supervisors plus admission).

The real executor lives in ``p2pdeploy.runtime.executor``, the simulated one in
``p2pdeploy.sim.executor``. Nothing here does I/O, reads a clock or draws randomness.
"""
