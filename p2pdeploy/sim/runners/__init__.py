"""Built-in scenario runners; every module here registers itself when imported.

``p2pdeploy.sim.runner.discover_runners()`` imports each module of this package, so a new
runner is a new module with a :func:`~p2pdeploy.sim.runner.register_runner` class in it.
"""
