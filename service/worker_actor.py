"""The Ray actor shell of an expert worker: the control plane around `ExpertWorker` and its data plane.

Owns starting the worker's socket server in the actor process (TCP on the node's IP, plus a Unix
socket under a per-actor temp folder for engines on the same node) and reporting where it lives
(`WorkerInfo`). Every other method passes straight through to `ExpertWorker`. Ignores placement and
scheduling: the coordinator creates the actor with
`ExpertWorkerActor.options(name=..., namespace=..., num_cpus=<fraction>, num_gpus=<1 on GPUs>,
lifetime=..., max_concurrency=4).remote(config)`.

Migration moves weights worker to worker through the object store: the caller passes the ObjectRef of
`src.export_experts.remote(keys)` straight to `dst.import_experts.remote(...)`; Ray resolves it there.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence

import ray

from service.experts import Key
from service.messages import ExpertTensors, LatencySamples, Telemetry, WorkerInfo
from service.transport import WorkerServer
from service.worker import DEFAULT_PROFILE_TOKENS, ExpertWorker, WorkerConfig, WorkerStats


@ray.remote
class ExpertWorkerActor:
    """One device's expert worker as a Ray actor (threaded: control calls may overlap forwards)."""

    def __init__(self, config: WorkerConfig) -> None:
        self._worker = ExpertWorker(config)
        self._record: dict = {}  # the coordinator's latest placement record (for its recovery)
        self._socket_dir = tempfile.mkdtemp(prefix="vibe-serve-")
        self._server = WorkerServer(self._worker, host=ray.util.get_node_ip_address(),
                                    unix_path=os.path.join(self._socket_dir, "worker.sock"))
        atexit.register(self.shutdown)  # a normal process exit also removes the socket folder

    def info(self) -> WorkerInfo:
        context = ray.get_runtime_context()
        config = self._worker.config
        return WorkerInfo(
            index=config.index,
            actor_name=context.get_actor_name() or "",
            tcp_address=self._server.tcp_address,
            unix_address=self._server.unix_address,
            node_id=context.get_node_id(),
            device=config.device,
            emulated=config.emulation is not None,
        )

    def load_experts(self, checkpoint_dir: str, keys: Iterable[Key]) -> list[Key]:
        return self._worker.load_experts(checkpoint_dir, keys)

    def import_experts(self, items: Iterable[ExpertTensors]) -> list[Key]:
        return self._worker.import_experts(items)

    def export_experts(self, keys: Iterable[Key]) -> list[ExpertTensors]:
        return self._worker.export_experts(keys)

    def drop_experts(self, keys: Iterable[Key]) -> None:
        self._worker.drop_experts(keys)

    def held_experts(self) -> list[Key]:
        return self._worker.held_experts()

    def profile(self, token_counts: Sequence[int] = DEFAULT_PROFILE_TOKENS, repeats: int = 3) -> LatencySamples:
        return self._worker.profile(token_counts, repeats)

    def telemetry(self) -> Telemetry:
        return self._worker.telemetry()

    def set_emulated_speed(self, factor: float) -> None:
        self._worker.set_emulated_speed(factor)

    def stats(self) -> WorkerStats:
        return self._worker.stats()

    def inject_fault(self, operation: str) -> None:
        self._worker.inject_fault(operation)

    def ping(self) -> bool:
        return True

    def set_record(self, record: dict) -> None:
        """Keep the coordinator's latest placement record, so a restarted coordinator can recover it."""
        self._record = dict(record)

    def get_record(self) -> dict:
        return self._record

    def shutdown(self) -> None:
        """Close the data plane and remove the socket folder (call before killing the actor)."""
        self._server.close()
        shutil.rmtree(self._socket_dir, ignore_errors=True)
