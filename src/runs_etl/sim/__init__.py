"""The built-in simulator of the Noxus runs API: ``server`` serves what ``data`` generates.
``python -m runs_etl.sim`` serves one on its own."""

from .server import Faults, Simulator

__all__ = ["Faults", "Simulator"]
