"""A GPU worker refuses to start where it would not compute on the GPU Ray gave it (from the GPU deployment audit)."""

from __future__ import annotations

import pytest

from service import worker_actor
from service.worker import WorkerConfig
from service.worker_actor import check_own_gpu


def test_a_worker_ray_named_its_gpu_for_starts():
    check_own_gpu(["3"], "3", 1)  # Ray's CUDA_VISIBLE_DEVICES: cuda is GPU 3
    check_own_gpu([0], None, 1)  # a node with one GPU: there is no other to compute on
    check_own_gpu(["2", "3"], "2,3", 2)  # a worker given two GPUs sees both


def test_a_worker_that_would_compute_on_the_nodes_first_gpu_is_refused():
    with pytest.raises(RuntimeError, match="sees 8 GPUs \\(CUDA_VISIBLE_DEVICES not set.* Ray gave it 1 \\(5\\)"):
        check_own_gpu(["5"], None, 8)


def test_a_worker_that_sees_gpus_set_for_the_whole_node_is_refused():
    """CUDA_VISIBLE_DEVICES set for the node (the image's, or the user's) and kept by
    RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES: set, but not to the worker's own GPU (a review)."""
    with pytest.raises(RuntimeError, match="sees 4 GPUs \\(CUDA_VISIBLE_DEVICES '0,1,2,3'"):
        check_own_gpu(["2"], "0,1,2,3", 4)


def test_a_worker_that_sees_as_many_gpus_but_not_its_own_is_refused():
    """One GPU visible, as Ray gave one, but another: a CUDA_VISIBLE_DEVICES set for the workers and kept by
    RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES (every worker of the node would compute on GPU 0)."""
    with pytest.raises(RuntimeError, match="CUDA_VISIBLE_DEVICES is '0' where Ray gave it GPU 2"):
        check_own_gpu(["2"], "0", 1)
    with pytest.raises(RuntimeError, match="where Ray gave it GPU 2, 3"):
        check_own_gpu(["2", "3"], "1,2", 2)
    check_own_gpu([2, 3], "3, 2", 2)  # (the same GPUs in another order, ids as ints)


def test_a_gpu_worker_without_a_gpu_is_refused():
    with pytest.raises(RuntimeError, match="worker_num_gpus > 0"):
        check_own_gpu([], "0", 1)
    with pytest.raises(RuntimeError, match="torch sees no CUDA device"):  # Ray gave one, the driver shows none
        check_own_gpu(["0"], "0", 0)


def test_the_actor_checks_its_gpu_before_it_holds_anything(monkeypatch):
    """The check is wired into the actor's start: a cuda worker calls it with Ray's GPU ids and what torch sees."""
    import torch

    calls = []
    monkeypatch.setattr(worker_actor.ray, "get_gpu_ids", lambda: ["5"])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    actor_class = worker_actor.ExpertWorkerActor.__ray_actor_class__
    # (the globals its __init__ reads: after an integration test in this process created worker actors, they are
    # no longer the module's own dict, so patching the module missed the call in a full run)
    monkeypatch.setitem(actor_class.__init__.__globals__, "check_own_gpu",
                        lambda *args: calls.append(args) or check_own_gpu(*args))
    with pytest.raises(RuntimeError, match="sees 8 GPUs"):
        actor_class(WorkerConfig(index=0, device="cuda"))
    assert calls == [(["5"], None, 8)]
