"""Training zoo members: Adam with a one-cycle schedule, one member per process where there are cores to spare."""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..base.files import commit
from .architectures import build
from .partition import Partition


def train_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int,
                batch_size: int = 128, lr: float = 1e-3, progress: tuple | None = None) -> nn.Module:
    """Adam with a cosine schedule; the seed fixes both the data order (init is seeded by the caller)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if progress is not None:  # (a rich Progress, its task)
                progress[0].advance(progress[1])
    return model.eval()


@dataclass(frozen=True)
class Member:
    """One zoo member to train: its seed, its shard (`index` of `n` under `partition`) and its checkpoint."""
    arch: str
    width: int
    epochs: int
    seed: int
    index: int
    n: int
    partition: Partition
    path: str


def train_member(job: Member, splits=None, progress=None) -> None:
    """Train one member and write its checkpoint (safetensors, the host's file modes)."""
    from safetensors.torch import save_file

    from .data import load_dataset

    splits = splits if splits is not None else load_dataset("fashion-mnist")
    shard = job.partition.shards(splits.y_train, job.n)[job.index]
    x, y = splits.x_train[shard], splits.y_train[shard]
    torch.manual_seed(job.seed)
    model = build(job.arch, width=job.width)
    task = progress.add_task(f"training {job.arch} seed {job.seed}", total=job.epochs * ((len(x) + 127) // 128)) \
        if progress is not None else None
    train_model(model, x, y, job.epochs, seed=job.seed, progress=(progress, task) if task is not None else None)
    fd, tmp = tempfile.mkstemp(dir=Path(job.path).parent, suffix=".tmp")
    os.close(fd)
    save_file(model.state_dict(), tmp, metadata={"arch": job.arch, "width": str(job.width)})
    commit(Path(tmp), Path(job.path))  # the host's file modes (mkstemp's are private)


def train_in_workers(jobs: list[Member], workers: int, progress) -> None:
    """Members trained side by side in spawned processes of one torch thread each (on 2 cores, 2 members in the
    time of one); Ctrl-C stops them all and says one line."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    task = progress.add_task(f"training {len(jobs)} × {jobs[0].arch} in {workers} processes", total=len(jobs))
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_worker_setup)
    try:
        for f in as_completed([pool.submit(train_member, job) for job in jobs]):
            f.result()
            progress.advance(task)
    except KeyboardInterrupt:
        for proc in list((getattr(pool, "_processes", None) or {}).values()):
            proc.terminate()
        raise
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _worker_setup() -> None:
    """One torch thread per worker; Ctrl-C is the parent's to handle."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
