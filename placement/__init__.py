"""ViBE expert placement: pure algorithms over NumPy (and SciPy for the exact reference).

No Ray, torch or HTTP here; the service calls this package and nothing in it calls back.
"""

from placement.bounds import exact_makespan, lower_bound
from placement.device_model import DeviceModel
from placement.drift import (
    DeviceDriftDetector,
    DeviceDriftTracker,
    DriftReport,
    WorkloadDriftDetector,
    cosine_distance,
)
from placement.metrics import balancedness, device_times, imbalance, makespan, pass_critical_paths
from placement.migration import (
    Drop,
    HeldOutGain,
    MigrationPlan,
    held_out_gain,
    migration_plan,
    predicted_gain,
    worth_moving,
)
from placement.placement import Placement
from placement.policies import POLICIES, plan
from placement.rebalance import Move, evacuate, rebalance
from placement.simulate import PROFILES, ScaleStudyConfig, evaluate, sample_devices, scale_study
from placement.traces import Trace, load_trace, load_traces, resample_experts, scale_loads, trace_dir

__all__ = ["DeviceModel", "Placement", "balancedness", "device_times", "imbalance", "makespan", "pass_critical_paths"]
__all__ += ["POLICIES", "Move", "evacuate", "exact_makespan", "lower_bound", "plan", "rebalance"]
__all__ += ["DeviceDriftDetector", "DeviceDriftTracker", "DriftReport", "WorkloadDriftDetector", "cosine_distance"]
__all__ += ["Drop", "HeldOutGain", "MigrationPlan", "held_out_gain", "migration_plan", "predicted_gain", "worth_moving"]
__all__ += ["PROFILES", "ScaleStudyConfig", "evaluate", "sample_devices", "scale_study"]
__all__ += ["Trace", "load_trace", "load_traces", "resample_experts", "scale_loads", "trace_dir"]
