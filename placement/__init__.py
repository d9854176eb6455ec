"""ViBE expert placement: pure algorithms over NumPy (and SciPy for the exact reference).

No Ray, torch or HTTP here; the service calls this package and nothing in it calls back.
"""

from placement.bounds import exact_makespan, lower_bound
from placement.device_model import DeviceModel
from placement.metrics import balancedness, device_times, imbalance, makespan
from placement.placement import Placement
from placement.policies import POLICIES, plan
from placement.rebalance import Move, rebalance

__all__ = ["DeviceModel", "Placement", "balancedness", "device_times", "imbalance", "makespan"]
__all__ += ["POLICIES", "Move", "exact_makespan", "lower_bound", "plan", "rebalance"]
