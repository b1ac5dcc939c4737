"""libra-worker: a load-balancer agent driven by Gearman messages."""

__version__ = "1.0.0"
