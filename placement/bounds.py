"""Reference values for judging placements: a proven lower bound per layer and the exact MILP optimum.

Owns `lower_bound` (LP relaxation plus a pigeonhole bound, fast enough for DeepSeek-V3 scale) and
`exact_makespan` (scipy's HiGHS MILP, small instances only). Both evaluate the same cost the policies
minimise: a device's time is the sum of its slots' curve values, the layer's time is the slowest device's.
Knows nothing of how placements are made.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from placement.device_model import DeviceModel
from placement.metrics import curve_params, latency_matrix
from placement.policies import checked_budget, checked_devices, checked_loads

MAX_EXACT_EXPERTS = 16
MAX_EXACT_DEVICES = 4
_MILP_OPTIONS = {"mip_rel_gap": 1e-9}
# The bounds sum the same seconds as `metrics.device_times` in other orders; this much below them
# covers the float rounding (measured up to 1.2e-14 relative).
_ROUNDING = 1e-12
# scipy's solvers are imported where they are used: scipy.optimize takes about 0.5 s to import, and every worker
# process imports `placement` (for its latency curves) without ever bounding a placement.


def lower_bound(loads: np.ndarray, devices: Sequence[DeviceModel], *, num_redundant: int = 0,
                slot_budget: int | Sequence[int] | None = None) -> np.ndarray:
    """float [L]: seconds that no placement of each layer can beat (proven, not estimated).

    Covers every placement with R = E + num_redundant slots, at most `slot_budget` per device (exactly
    R / G without one), any replica shares, replicas of one expert on the same or distinct devices.

    Args:
        loads: float [L, E], tokens per logical expert. devices: G device curves.
    Returns:
        The largest of the LP relaxation (`_lp_bound`) and, without replicas, the pigeonhole bound
        (`_pigeonhole_bound`) and, with exactly R / G slots per device, the heavy-devices average
        (`_heavy_average_bound`), per layer.
    """
    loads, params, slots = _checked(loads, devices, num_redundant, slot_budget)
    replicas = num_redundant > 0
    bound = _lp_bound(loads, params, slots, replicas)
    if not replicas:
        bound = np.maximum(bound, _pigeonhole_bound(loads, params, slots, exact=slot_budget is None))
        if slot_budget is None:
            bound = np.maximum(bound, _heavy_average_bound(loads, params, int(slots[0])))
    return bound * (1.0 - _ROUNDING)


def split_cost(loads: np.ndarray, params: np.ndarray) -> np.ndarray:
    """float [..., G]: h_g(W) = W * min_{0 < n <= W} f_g(n) / n, the least cost per whole expert share.

    For any share x in (0, 1]: f_g(x W) = x W * f_g(xW) / (xW) >= x W * min_{0<n<=W} f_g(n) / n = x h_g(W),
    so an expert split into replicas with shares x_1..x_c costs at least sum_i x_i h_g(W) on the devices
    holding them. For the flat-then-linear curve, f(n) / n is fixed / n up to the knee (decreasing), then
    slope + (fixed - slope * knee) / n: decreasing when fixed >= slope * knee (minimum at n = W, so
    h = f(W)), increasing otherwise (minimum at the knee, so h = W * fixed / knee once W > knee).
    """
    fixed, knee, slope = params
    tokens = np.asarray(loads, dtype=np.float64)[..., None]
    rising = fixed < slope * knee  # then knee > 0 and fixed / knee < slope: no overflow
    per_token = np.divide(fixed, knee, out=np.zeros_like(fixed), where=rising)
    return np.where((tokens > knee) & rising, tokens * per_token, latency_matrix(loads, params))


def _lp_bound(loads: np.ndarray, params: np.ndarray, slots: np.ndarray, replicas: bool) -> np.ndarray:
    """float [L]: the LP relaxation of each layer's assignment, certified by its dual (HiGHS).

    Devices with the same curve and slots form a class c of m_c devices with S_c slots in all. Primal:
    variables x[e, c] >= 0 (share of expert e's tokens on class c) and T; minimise T subject to
    sum_c x[e, c] = 1, sum_e x[e, c] <= S_c and sum_e cost[e, c] x[e, c] <= m_c T. Any placement gives
    a feasible point: x[e, c] = the summed shares of e's replicas on c's devices; each slot adds at most
    1 to sum_e x[e, c]; each device's time is at least sum_e cost[e, c] (its share of e) (without
    replicas shares are 0/1 and cost = f_c(W_e) exactly; with replicas cost = h_c(W_e) by `split_cost`),
    and m_c devices each within T sum to at most m_c T. So the LP optimum <= any makespan. (Grouping
    loses nothing: spreading a class's x evenly over its devices is feasible for the per-device LP.)
    Certificate: for any lam, mu >= 0 (lam not all 0) and any such x,
        T sum_c lam_c m_c >= sum_e sum_c (lam_c cost[e, c] + mu_c) x[e, c] - sum_c mu_c S_c
                          >= sum_e min_c (lam_c cost[e, c] + mu_c) - sum_c mu_c S_c,
    and that bound, evaluated at the solver's duals, holds whatever the solver's accuracy.
    """
    classes, first, member = np.unique(np.vstack([params, slots]).T, axis=0, return_index=True,
                                       return_inverse=True)
    count = np.bincount(member.ravel(), minlength=len(classes)).astype(np.float64)
    class_slots = np.bincount(member.ravel(), weights=slots, minlength=len(classes))
    cost = split_cost(loads, params[:, first]) if replicas else latency_matrix(loads, params[:, first])
    model = _ClassLP(loads.shape[1], count, class_slots)
    out = np.zeros(loads.shape[0])
    for layer in range(loads.shape[0]):
        scale = float(cost[layer].max())
        if scale > 0:  # O(1) coefficients for the solver's tolerances
            out[layer] = model.bound(cost[layer] / scale) * scale
    return out


class _ClassLP:
    """The LP of `_lp_bound` for E experts over device classes (count [C], slots [C]); costs vary per layer."""

    def __init__(self, num_experts: int, count: np.ndarray, slots: np.ndarray) -> None:
        num_classes = count.size
        n = num_experts * num_classes
        x = np.arange(n)
        from scipy.sparse import csr_array

        self.count, self.slots = count, slots
        self.a_eq = csr_array((np.ones(n), (x // num_classes, x)), shape=(num_experts, n + 1))
        self.rows = np.concatenate([x % num_classes, num_classes + x % num_classes,
                                    num_classes + np.arange(num_classes)])
        self.cols = np.concatenate([x, x, np.full(num_classes, n)])
        self.b_ub = np.concatenate([slots, np.zeros(num_classes)])
        self.objective = np.zeros(n + 1)
        self.objective[-1] = 1.0

    def bound(self, cost: np.ndarray) -> float:
        """The certified LP optimum for cost [E, C]."""
        from scipy.optimize import linprog
        from scipy.sparse import csr_array

        num_experts, num_classes = cost.shape
        values = np.concatenate([np.ones(cost.size), cost.ravel(), -self.count])
        a_ub = csr_array((values, (self.rows, self.cols)), shape=(2 * num_classes, cost.size + 1))
        result = linprog(self.objective, A_ub=a_ub, b_ub=self.b_ub, A_eq=self.a_eq, b_eq=np.ones(num_experts),
                         bounds=(0, None), method="highs-ds", options={"presolve": False})
        if result.status != 0:  # (not an assert: it holds under python -O too)
            raise RuntimeError(f"LP bound failed: {result.message}")
        dual = np.maximum(-result.ineqlin.marginals, 0.0)  # scipy reports d(objective)/d(b_ub) <= 0
        mu, lam = dual[:num_classes], dual[num_classes:]
        weight = float(lam @ self.count)
        if weight <= 0:
            return 0.0
        return max(float(((lam * cost + mu).min(axis=1).sum() - mu @ self.slots) / weight), 0.0)


def _pigeonhole_bound(loads: np.ndarray, params: np.ndarray, slots: np.ndarray, exact: bool) -> np.ndarray:
    """float [L]: bound for placements without replicas, from where the heaviest experts must go.

    Let G' be the devices with a slot and W_(1) >= W_(2) >= ... the sorted loads. For j >= 0, the
    j G' + 1 heaviest experts sit on G' devices, so some device g (with at least j + 1 slots) holds j + 1
    of them, which cost at least the j + 1 lightest of them on g (f_g is non-decreasing). When every
    device holds exactly its slots (`exact`), g's other slots_g - j - 1 experts cost at least the
    lightest experts on g. So the makespan >= min_g of that sum, for every j.
    """
    num_layers, num_experts = loads.shape
    ordered = -np.sort(-loads, axis=1)
    cost = latency_matrix(ordered, params)  # [L, E, G], non-increasing along E
    prefix = np.concatenate([np.zeros((num_layers, 1, cost.shape[2])), np.cumsum(cost, axis=1)], axis=1)
    held = int(np.count_nonzero(slots))
    out = np.zeros(num_layers)
    for j in range(int(slots.max())):
        top = j * held + 1
        if top > num_experts:
            break
        total = prefix[:, top] - prefix[:, top - j - 1]  # [L, G]
        if exact:
            rest = slots - j - 1  # experts besides the j + 1, the lightest ones (disjoint from the top)
            total = total + prefix[:, num_experts] - prefix[:, num_experts - rest, np.arange(slots.size)]
        total = np.where(slots >= j + 1, total, np.inf)
        out = np.maximum(out, total.min(axis=1))
    return out


def _heavy_average_bound(loads: np.ndarray, params: np.ndarray, per_device: int) -> np.ndarray:
    """float [L]: bound without replicas when every device holds exactly `per_device` experts.

    Let c_e = min_g f_g(W_e), sorted descending. For any m <= G, the m heaviest experts sit on some
    d devices, ceil(m / per_device) <= d <= m. Those devices hold d * per_device experts: the m heavy
    ones and d * per_device - m others, which cost at least the that many smallest c_e. Their mean time,
    a lower bound on the slowest, is then at least (sum of the m largest c + that many smallest c) / d;
    the minimum over the possible d bounds the makespan, for every m. (Catches layers whose few hot
    experts cannot share devices with the experts that cost nothing.)
    """
    num_layers, num_experts = loads.shape
    cheapest = -np.sort(-latency_matrix(loads, params).min(axis=2), axis=1)  # [L, E], descending
    prefix = np.concatenate([np.zeros((num_layers, 1)), np.cumsum(cheapest, axis=1)], axis=1)
    out = np.zeros(num_layers)
    for heavy in range(1, params.shape[1] + 1):
        spread = np.arange(-(-heavy // per_device), heavy + 1)  # possible device counts d
        others = spread * per_device - heavy
        light = prefix[:, [num_experts]] - prefix[:, num_experts - others]  # [L, D]
        out = np.maximum(out, ((prefix[:, [heavy]] + light) / spread).min(axis=1))
    return out


def exact_makespan(loads: np.ndarray, devices: Sequence[DeviceModel], *, num_redundant: int = 0) -> np.ndarray:
    """float [L]: the optimal makespan of each layer by MILP (HiGHS), for E <= 16 and G <= 4.

    Equal slots per device (R / G each). Without replicas the optimum is over all one-slot-per-expert
    placements; with `num_redundant` > 0 it is over placements whose replicas of one expert sit on
    distinct devices with any token shares (the placements `vibe` makes). The value is the makespan of
    the solver's optimal placement evaluated exactly (the solver's own objective is only good to its
    feasibility tolerance); the MILP runs in time units of the layer's slowest whole expert.
    """
    loads, params, slots = _checked(loads, devices, num_redundant, None)
    num_experts, num_devices = loads.shape[1], params.shape[1]
    if num_experts > MAX_EXACT_EXPERTS or num_devices > MAX_EXACT_DEVICES:
        raise ValueError(f"exact_makespan handles E <= {MAX_EXACT_EXPERTS} and G <= {MAX_EXACT_DEVICES}, "
                         f"got E={num_experts}, G={num_devices}")
    if num_redundant and slots[0] > num_experts:  # (the MILP was infeasible: a bare AssertionError)
        raise ValueError(f"exact_makespan keeps an expert's replicas on distinct devices: {slots[0]} slots per device "
                         f"(E + num_redundant = {num_experts + num_redundant} over G={num_devices}) exceed E={num_experts}")
    model = _replica_milp if num_redundant else _assignment_milp
    # A layer no expert costs anything in (no load, or curves of zero cost) has makespan 0; the MILPs
    # scale by the costliest expert and could not.
    return np.array([model(layer_loads, params, int(slots[0])) if latency_matrix(layer_loads, params).any()
                     else 0.0 for layer_loads in loads])


def _assignment_milp(loads: np.ndarray, params: np.ndarray, per_device: int) -> float:
    """Min T over binary x[e, g]: sum_g x = 1, sum_e x = per_device, sum_e f_g(W_e) x[e, g] <= T."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    num_experts, num_devices = loads.size, params.shape[1]
    cost = latency_matrix(loads, params)  # [E, G] seconds
    # Times in units of a placement's makespan, not of the costliest (expert, device) pair: one a billion times the
    # optimum left HiGHS's tolerances (1e-7) wider than the differences that decide it, 4.3x the optimum (a review).
    # A pair costlier than that makespan is in no better placement.
    unit = _greedy_makespan(cost, per_device)
    num_x = num_experts * num_devices
    eye_e = np.kron(np.eye(num_experts), np.ones(num_devices))  # [E, E*G]
    eye_g = np.kron(np.ones(num_experts), np.eye(num_devices))  # [G, E*G]
    constraints = [
        LinearConstraint(np.hstack([eye_e, np.zeros((num_experts, 1))]), 1, 1),
        LinearConstraint(np.hstack([eye_g, np.zeros((num_devices, 1))]), per_device, per_device),
        LinearConstraint(np.hstack([eye_g * np.minimum(cost / unit, 2.0).ravel(), -np.ones((num_devices, 1))]),
                         -np.inf, 0),
    ]
    objective = np.zeros(num_x + 1)
    objective[-1] = 1.0
    integrality = np.concatenate([np.ones(num_x), [0]])
    bounds = Bounds(np.zeros(num_x + 1), np.concatenate([(cost <= unit).ravel().astype(float), [np.inf]]))
    x = _solved(milp(objective, integrality=integrality, bounds=bounds, constraints=constraints,
                     options=_MILP_OPTIONS))
    chosen = np.round(x[:num_x]).reshape(num_experts, num_devices)
    return float((cost * chosen).sum(axis=0).max())


def _greedy_makespan(cost: np.ndarray, per_device: int) -> float:
    """The makespan of a greedy one-slot-per-expert placement of ``cost`` [E, G] seconds (heaviest expert first, onto
    the device with room it finishes soonest on): an upper bound on the optimum; the smallest cost if it is 0."""
    finish, room = np.zeros(cost.shape[1]), np.full(cost.shape[1], per_device)
    for expert in np.argsort(-cost.min(axis=1), kind="stable"):
        open_ = np.flatnonzero(room > 0)
        device = open_[np.argmin(finish[open_] + cost[expert, open_])]
        finish[device] += cost[expert, device]
        room[device] -= 1
    return float(finish.max()) or float(cost[cost > 0].min())


def _replica_milp(loads: np.ndarray, params: np.ndarray, per_device: int) -> float:
    """Min T over replicas y[e, g] (binary), shares s[e, g] and tokens beyond the knee z[e, g].

    Device g's time is sum_e fixed_g y[e, g] + slope_g z[e, g] with z >= W_e s - knee_g y, z >= 0: exact
    for the flat-then-linear curve at the optimum (z only inflates a time), with s <= y, sum_g s = 1,
    sum_e y = per_device. A replica with share 0 costs `fixed`, as any tiny positive share does; an
    expert without load costs nothing.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    num_experts, num_devices = loads.size, params.shape[1]
    unit = latency_matrix(loads, params).max()
    fixed, knee, slope = params[0] / unit, params[1], params[2] / unit
    n = num_experts * num_devices
    eye_e = np.kron(np.eye(num_experts), np.ones(num_devices))  # [E, n]
    eye_g = np.kron(np.ones(num_experts), np.eye(num_devices))  # [G, n]
    load = np.repeat(loads, num_devices)  # [n], W_e of each (e, g)
    eye = np.eye(n)
    paid_fixed = eye_g * np.where(load > 0, np.tile(fixed, num_experts), 0.0)
    constraints = [  # variables: y [n], s [n], z [n], T
        LinearConstraint(_columns(num_devices, n, y=eye_g), per_device, per_device),
        LinearConstraint(_columns(num_experts, n, s=eye_e), 1, 1),
        LinearConstraint(_columns(n, n, y=-eye, s=eye), -np.inf, 0),  # s <= y
        LinearConstraint(_columns(n, n, y=-np.diag(np.tile(knee, num_experts)), s=np.diag(load), z=-eye),
                         -np.inf, 0),  # W s - knee y <= z
        LinearConstraint(_columns(num_devices, n, y=paid_fixed, z=eye_g * np.tile(slope, num_experts), t=-1.0),
                         -np.inf, 0),  # device time <= T
    ]
    objective = np.zeros(3 * n + 1)
    objective[-1] = 1.0
    integrality = np.concatenate([np.ones(n), np.zeros(2 * n + 1)])
    bounds = Bounds(np.zeros(3 * n + 1), np.concatenate([np.ones(2 * n), np.full(n + 1, np.inf)]))
    x = _solved(milp(objective, integrality=integrality, bounds=bounds, constraints=constraints,
                     options=_MILP_OPTIONS))
    held = np.round(x[:n]).reshape(num_experts, num_devices) > 0
    share = np.where(held, np.maximum(x[n:2 * n].reshape(held.shape), 0.0), 0.0)
    tokens = loads[:, None] * share / share.sum(axis=1, keepdims=True)
    seconds = params[0] + params[2] * np.maximum(tokens - params[1], 0.0)  # a held replica costs >= fixed
    return float(np.where(held & (loads[:, None] > 0), seconds, 0.0).sum(axis=0).max())


def _columns(rows: int, n: int, y=None, s=None, z=None, t: float = 0.0) -> np.ndarray:
    """[rows, 3 n + 1] constraint rows over the blocks (y, s, z, T); a missing block is zeros."""
    blocks = [np.zeros((rows, n)) if block is None else block for block in (y, s, z)]
    return np.hstack(blocks + [np.full((rows, 1), t)])


def _solved(result) -> np.ndarray:
    if result.status != 0:
        raise RuntimeError(f"MILP failed: {result.message}")
    return result.x


def _checked(loads, devices, num_redundant, slot_budget) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validated loads [L, E], curve params [3, G] and slots per device [G]."""
    loads = checked_loads(loads)
    num_devices = checked_devices(devices)
    if not isinstance(num_redundant, int | np.integer) or num_redundant < 0:
        raise ValueError(f"num_redundant must be an int >= 0, got {num_redundant!r}")
    num_slots = loads.shape[1] + num_redundant
    capacity = checked_budget(slot_budget, num_devices, num_slots)
    if capacity is None:
        if num_slots % num_devices:
            raise ValueError(f"E + num_redundant = {num_slots} must be divisible by G={num_devices} "
                             f"without slot_budget")
        capacity = np.full(num_devices, num_slots // num_devices)
    return loads, curve_params(devices), capacity
