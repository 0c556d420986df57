"""The launchers' collectives (``Runtime.all_reduce`` / ``barrier``): nothing with one
worker, torch.distributed's exact sum and min over a real two-process gloo group."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer.launch.runtime import Collectives, LocalRuntime


def test_one_local_worker_reduces_to_itself(tmp_path):
    runtime = LocalRuntime(tmp_path, "run", use_gpu=False)
    t = torch.tensor([1.5, -2.0], dtype=torch.float64)
    assert runtime.all_reduce(t) is t and t.tolist() == [1.5, -2.0]
    assert runtime.all_reduce(t, op="min").tolist() == [1.5, -2.0]
    runtime.barrier()
    with pytest.raises(ValueError, match="op must be 'sum' or 'min', got 'max'"):
        runtime.all_reduce(t, op="max")


class _Group(Collectives):
    def __init__(self, world: int) -> None:
        self.world = world


def _worker(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        group = _Group(world)
        summed = group.all_reduce(torch.tensor([rank + 1.0, 10.0 * rank], dtype=torch.float64))
        least = group.all_reduce(torch.tensor([float(rank) - 3.0]), op="min")
        group.barrier()
        torch.save({"sum": summed, "min": least}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_workers_sum_and_min_exactly(tmp_path):
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_worker, args=(2, init, str(tmp_path / "out")), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"out.{rank}")
        assert got["sum"].tolist() == [3.0, 10.0] and got["min"].tolist() == [-3.0]
