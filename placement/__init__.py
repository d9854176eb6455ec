"""ViBE expert placement: pure algorithms over NumPy (and SciPy for the exact reference).

No Ray, torch or HTTP here; the service calls this package and nothing in it calls back.
"""

from placement.device_model import DeviceModel
from placement.metrics import balancedness, device_times, imbalance, makespan
from placement.placement import Placement

__all__ = ["DeviceModel", "Placement", "balancedness", "device_times", "imbalance", "makespan"]
