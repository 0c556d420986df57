"""One bank interface: the in-process bank and the sharded store both keep ``Bank``, and
what a training checkpoint keeps of either restores it exactly (or fails naming the
checkpoint when it holds nothing for that kind of bank)."""

from __future__ import annotations

import pytest
import torch
from reference import unit

from featurestore import NCE, MemoryBank
from featurestore.bank_protocol import Bank

N, D = 60, 8


def steps(bank, n: int = 3) -> None:
    for t in range(n):
        ids = torch.arange(t * 10, t * 10 + 10)
        bank.step(unit(10, D, seed=t), ids, NCE(num_negatives=7))


def test_memory_bank_checkpoint_restores_rows_z_and_step():
    bank = MemoryBank(N, D, seed=4)
    assert isinstance(bank, Bank) and bank.in_process
    steps(bank)
    kept = bank.checkpoint_state()
    assert set(kept) == {"bank"}
    other = MemoryBank(N, D, seed=4)
    other.restore_checkpoint(kept, "ckpt-3")
    assert torch.equal(other.get(torch.arange(N)), bank.get(torch.arange(N)))
    assert (other.z, other.step_count) == (bank.z, bank.step_count) and bank.z is not None
    with pytest.raises(ValueError, match="checkpoint ckpt-9 holds no in-process bank"):
        other.restore_checkpoint({"store_snapshot": "s3://x"}, "ckpt-9")


@pytest.mark.ray
def test_store_checkpoint_names_a_snapshot_that_restores_it(make_store, tmp_path):
    store = make_store(num_rows=N, dim=D, num_shards=2, seed=4, snapshot_dir=str(tmp_path))
    assert isinstance(store, Bank) and not store.in_process
    steps(store)
    kept = store.checkpoint_state()
    assert set(kept) == {"store_snapshot"} and kept["store_snapshot"].startswith(str(tmp_path))
    rows, z, step = store.get(torch.arange(N)), store.z, store.step_count
    steps(store, 2)
    store.restore_checkpoint(kept, "ckpt-3")
    assert torch.equal(store.get(torch.arange(N)), rows)
    assert (store.z, store.step_count) == (z, step)
    with pytest.raises(ValueError, match="checkpoint ckpt-9 names no store snapshot"):
        store.restore_checkpoint({"bank": {}}, "ckpt-9")
