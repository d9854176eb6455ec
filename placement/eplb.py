"""DeepSeek EPLB's global policy, in NumPy: replicate hot experts, then pack the replicas into devices.

Owns the token-count baseline that vLLM, SGLang and TensorRT-LLM adopted (DeepSeek's `rebalance_experts`
with `num_groups=1`, the global path). It balances token counts only and ignores device latency curves;
it may put two replicas of one expert on the same device, as the original does. Ties are broken the
same way in every step: the lowest index wins, and equal weights keep their index order when sorted.
"""

from __future__ import annotations

import numpy as np

from placement.placement import Placement


def replicate_experts(weight: np.ndarray, num_phy: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Add replicas one at a time to the logical expert with the highest load per replica.

    Args:
        weight: float [L, E], tokens per logical expert.
        num_phy: R >= E, physical experts (slots) after replication.
    Returns:
        phy2log: int [L, R], logical expert of each physical expert (the first E are 0..E-1).
        rank: int [L, R], replica rank of each physical expert within its logical expert.
        logcnt: int [L, E], replicas of each logical expert.
    """
    num_layers, num_log = weight.shape
    assert num_phy >= num_log
    rows = np.arange(num_layers)
    phy2log = np.tile(np.arange(num_phy), (num_layers, 1))
    rank = np.zeros((num_layers, num_phy), dtype=np.int64)
    logcnt = np.ones((num_layers, num_log), dtype=np.int64)
    for slot in range(num_log, num_phy):
        hottest = (weight / logcnt).argmax(axis=1)
        phy2log[:, slot] = hottest
        rank[:, slot] = logcnt[rows, hottest]
        logcnt[rows, hottest] += 1
    return phy2log, rank, logcnt


def balanced_packing(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack N weighted items into packs of exactly N / num_packs items each, balancing pack weights.

    Items are taken by weight descending; each goes to the lightest pack that still has room.

    Args:
        weight: float [L, N], weight of each item; N divisible by num_packs.
    Returns:
        pack_index: int [L, N], pack of each item.
        rank_in_pack: int [L, N], position of each item within its pack.
    """
    num_layers, num_items = weight.shape
    assert num_items % num_packs == 0
    per_pack = num_items // num_packs
    if per_pack == 1:  # as the original: one item per pack, in index order
        return np.tile(np.arange(num_items), (num_layers, 1)), np.zeros(weight.shape, dtype=np.int64)
    rows = np.arange(num_layers)
    order = np.argsort(-weight, axis=1, kind="stable")
    pack_weight = np.zeros((num_layers, num_packs))
    pack_items = np.zeros((num_layers, num_packs), dtype=np.int64)
    pack_index = np.empty((num_layers, num_items), dtype=np.int64)
    rank_in_pack = np.empty((num_layers, num_items), dtype=np.int64)
    for step in range(num_items):
        item = order[:, step]
        pack = np.where(pack_items < per_pack, pack_weight, np.inf).argmin(axis=1)
        pack_index[rows, item] = pack
        rank_in_pack[rows, item] = pack_items[rows, pack]
        pack_weight[rows, pack] += weight[rows, item]
        pack_items[rows, pack] += 1
    return pack_index, rank_in_pack


def rebalance_experts(weight: np.ndarray, num_replicas: int, num_gpus: int) -> tuple[np.ndarray, np.ndarray]:
    """EPLB's global policy: replicate, then pack the replicas (weight = load / replica count) into GPUs.

    Args:
        weight: float [L, E], tokens per logical expert.
        num_replicas: R, physical experts per layer; divisible by num_gpus.
    Returns:
        phy2log: int [L, R], logical expert of each slot, device-major (slot p on GPU p // (R / num_gpus)).
        logcnt: int [L, E], replicas of each logical expert.
    """
    phy2log, _, logcnt = replicate_experts(weight, num_replicas)
    tokens_per_phy = np.take_along_axis(weight / logcnt, phy2log, axis=1)
    pack_index, rank_in_pack = balanced_packing(tokens_per_phy, num_gpus)
    phy2pphy = pack_index * (num_replicas // num_gpus) + rank_in_pack
    pphy2phy = np.argsort(phy2pphy, axis=1)  # inverse permutation
    return np.take_along_axis(phy2log, pphy2phy, axis=1), logcnt


def eplb_placement(loads: np.ndarray, num_devices: int, num_redundant: int) -> Placement:
    """The EPLB placement of `loads` [L, E] on `num_devices` devices with `num_redundant` extra slots.

    Every replica of an expert takes an equal share of its tokens. Inputs are assumed validated
    (E + num_redundant divisible by num_devices).
    """
    num_layers, num_experts = loads.shape
    num_slots = num_experts + num_redundant
    phy2log, logcnt = rebalance_experts(loads, num_slots, num_devices)
    slot_device = np.arange(num_slots) // (num_slots // num_devices)
    share = 1.0 / np.take_along_axis(logcnt, phy2log, axis=1)
    return Placement(phy2log, np.broadcast_to(slot_device, phy2log.shape), share, num_experts, num_devices)
