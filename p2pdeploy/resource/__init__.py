"""The resource layer: describing nodes and services, and starting services on a node remotely.

- ``requirements``: the requirements language (``cpu_free >= 1 and "gpu" in tags``).
- ``description``: a node's attributes, and matching a service's needs against them.
- ``manifest``: the service manifest (``manifest.toml``), validated field by field.
- ``bundle``: signed tar.gz bundles and the rules for unpacking them safely.
- ``protocol``: the remote start/stop/status/logs protocol, signed and replay-protected.
"""
