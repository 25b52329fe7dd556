"""p2pdeploy: deploy services onto a peer-to-peer community of volunteer machines."""

__version__ = "0.1.0"
