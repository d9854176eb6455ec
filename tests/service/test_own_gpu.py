"""A GPU worker refuses to start where it would not compute on the GPU Ray gave it (from the GPU deployment audit)."""

from __future__ import annotations

import pytest

from service.worker_actor import check_own_gpu


def test_a_worker_ray_named_its_gpu_for_starts():
    check_own_gpu(["3"], "3", 1)  # Ray's CUDA_VISIBLE_DEVICES: cuda is GPU 3
    check_own_gpu([0], None, 1)  # a node with one GPU: there is no other to compute on


def test_a_worker_that_would_compute_on_the_nodes_first_gpu_is_refused():
    with pytest.raises(RuntimeError, match="first of the node's 8 GPUs, not on the one Ray gave it \\(5\\)"):
        check_own_gpu(["5"], None, 8)


def test_a_gpu_worker_without_a_gpu_is_refused():
    with pytest.raises(RuntimeError, match="worker_num_gpus > 0"):
        check_own_gpu([], "0", 1)
