"""Data-parallel training through Ray Train: the same training loop in every worker, the model in
DistributedDataParallel (`ray.train.torch.prepare_model`: gloo on CPU, NCCL on GPU), rank 0 writing
the run directory, which must be on a filesystem every worker sees.

May import: ray, clipreel.errors, clipreel.pipeline.raycluster.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

from clipreel.errors import ClipreelError
from clipreel.pipeline.raycluster import ensure_ray


@dataclass
class WorkerContext:
    """Where one Ray Train worker runs: its rank among world_size, its device, and the DDP wrapper."""

    rank: int
    world_size: int
    device: object  # torch.device
    prepare_model: Callable


def train_with_ray(worker: Callable[[dict], None], loop_config: dict, workers: int, address: str | None) -> None:
    """Run `worker(loop_config)` in `workers` Ray Train workers (one GPU each where the cluster has
    GPUs); a ClipreelError raised in a worker is raised here as it was."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    started_ray = ensure_ray(address)
    ray_storage = tempfile.mkdtemp(prefix="clipreel-ray-train-")  # Ray's own bookkeeping; we keep no Ray checkpoints
    try:
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
        trainer = TorchTrainer(
            worker,
            train_loop_config=loop_config,
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu),
            run_config=RunConfig(name="clipreel-train", storage_path=ray_storage),
        )
        try:
            trainer.fit()
        except ray.train.TrainingFailedError as error:
            raise _worker_error(error) from None
    finally:
        shutil.rmtree(ray_storage, ignore_errors=True)
        if started_ray:
            ray.shutdown()


def worker_context() -> WorkerContext:
    """Inside a Ray Train worker: its rank, the world size, its device and the DDP wrapper."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    return WorkerContext(context.get_world_rank(), context.get_world_size(), ray.train.torch.get_device(),
                         ray.train.torch.prepare_model)


def _worker_error(error: Exception) -> Exception:
    """A ClipreelError raised in a worker (a user-fixable problem), else Ray's own error."""
    for failure in getattr(error, "worker_failures", {}).values():
        if isinstance(failure, ClipreelError):
            return failure
        cause = failure.__cause__
        if isinstance(cause, ClipreelError):
            return cause
    return error
