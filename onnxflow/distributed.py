"""torch.distributed inside a training process: what the loop asks when it may be one of
several data-parallel workers (``train.workers``, launched by :mod:`onnxflow.recipes.ddp`).

Every helper answers for one process when no process group is initialised, so the loop
reads the same with one process or N:

* :func:`wrap` puts the model in ``DistributedDataParallel`` (gradients averaged across
  workers at each ``backward``); :func:`unwrap` gives the recipe's model back to save.
* :func:`row_sampler` gives each worker its share of the rows, reshuffled per epoch with
  the seed (``set_epoch``), the same number of rows on every worker (DDP steps together).
* :func:`sum_across` adds a few numbers over the workers (epoch loss, rows seen).
* :func:`is_main`: rank 0, the one that reports epochs and saves the model.

torch is imported inside the functions (nothing heavy at import).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence


def active() -> bool:
    """Whether this process is one of several workers of an initialised process group."""
    dist = _dist()
    return dist is not None and dist.is_available() and dist.is_initialized()


def rank() -> int:
    return _dist().get_rank() if active() else 0


def world_size() -> int:
    return _dist().get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0 (or the only process): it reports the epochs and saves the trained model."""
    return rank() == 0


def init_process_group(device: str, timeout_s: float | None = None) -> None:
    """Join the group torchrun describes in the environment (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``...): NCCL on GPUs (one per local rank), gloo on CPU; a collective
    step that waits longer than ``timeout_s`` for a peer raises (None: torch's default)."""
    import datetime as dt

    import torch
    import torch.distributed as dist

    from onnxflow.errors import TrainingError

    if device == "cuda":
        local, gpus = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        if local >= gpus:
            raise TrainingError(
                f"train.workers {os.environ.get('LOCAL_WORLD_SIZE', '?')} on a machine where "
                f"torch sees {gpus} GPU(s): NCCL needs one GPU per worker; set train.workers "
                f"to at most {gpus}, or train.device: cpu (gloo)"
            )
        torch.cuda.set_device(local)
    timeout = None if timeout_s is None else dt.timedelta(seconds=timeout_s)
    dist.init_process_group(backend="nccl" if device == "cuda" else "gloo", timeout=timeout)


def wrap(model, device: str):
    """``model`` in ``DistributedDataParallel`` when several workers train, else itself."""
    if not active():
        return model
    from torch.nn.parallel import DistributedDataParallel

    if device == "cuda":
        import torch

        return DistributedDataParallel(model, device_ids=[torch.cuda.current_device()])
    return DistributedDataParallel(model)


def unwrap(model):
    """The recipe's own model inside a ``DistributedDataParallel`` (or ``model`` itself)."""
    from_ddp = type(model).__name__ == "DistributedDataParallel"
    return model.module if from_ddp else model


def row_sampler(n_rows: int, *, seed: int, shuffle: bool = True):
    """This worker's rows of ``n_rows`` (``DistributedSampler``: a seeded permutation per
    epoch, every ``world_size``-th row from ``rank``, padded so every worker gets as many);
    None for one process (the loop shuffles all rows itself)."""
    if not active():
        return None
    from torch.utils.data import DistributedSampler

    return DistributedSampler(
        range(n_rows), num_replicas=world_size(), rank=rank(), shuffle=shuffle, seed=seed
    )


def sum_across(values: Sequence[float]) -> list[float]:
    """``values`` added element-wise over every worker (itself for one process)."""
    if not active():
        return [float(v) for v in values]
    import torch

    dist = _dist()
    backend = dist.get_backend()
    device = f"cuda:{torch.cuda.current_device()}" if backend == "nccl" else "cpu"
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.cpu().tolist()


def _dist():
    """``torch.distributed`` if torch is already imported (never imports it)."""
    torch = sys.modules.get("torch")
    return getattr(torch, "distributed", None) if torch is not None else None
