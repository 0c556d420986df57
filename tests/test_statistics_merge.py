"""Property tests: any split of the rows into shards merges to the same loss and gradient."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import unit

from featurestore import NCE, SampledSoftmax, Softmax
from featurestore.bank_shard import BankShard, initial_rows
from featurestore.noise import NoiseSpec, local_noise, shard_counts
from featurestore.statistics import (
    estimate_z,
    merge,
    positive_rows,
    softmax_stats_all,
)

N, D, B, K = 200, 8, 6, 30


def sharded_step(bounds, rows, feats, ids, objective, spec, z=None):
    """Run the protocol over shards with the given bounds; returns (loss [B], grad, z)."""
    shards = [BankShard(rows[lo:hi], lo, 0.5) for lo, hi in itertools.pairwise(bounds)]
    noises = [
        local_noise(spec, feats.shape[0], bounds, s) if objective.sampled else None
        for s in range(len(shards))
    ]
    if isinstance(objective, NCE) and z is None:
        expsum = sum(sh.expsum(feats, nz, objective.temperature) for sh, nz in zip(shards, noises))
        s_pos = (rows[ids] * feats).sum(1) / objective.temperature
        z = estimate_z(expsum, s_pos, rows.shape[0], feats.shape[0] * (K + 1))
    parts = [
        sh.statistics(feats, ids, objective, nz, z, rows.shape[0]) for sh, nz in zip(shards, noises)
    ]
    loss, grad = merge(parts, feats, objective, z, rows.shape[0])
    return loss, grad, z


@st.composite
def splits(draw):
    cuts = draw(st.lists(st.integers(1, N - 1), min_size=0, max_size=5, unique=True))
    return [0, *sorted(cuts), N]


OBJECTIVES = [
    NCE(num_negatives=K, prox_lambda=0.1),
    NCE(num_negatives=K, shared_noise=True),
    Softmax(temperature=0.1, prox_lambda=0.2),
    SampledSoftmax(num_negatives=K),
    SampledSoftmax(num_negatives=K, shared_noise=True, prox_lambda=0.3),
]


@settings(max_examples=25, deadline=None)
@given(bounds=splits(), which=st.integers(0, len(OBJECTIVES) - 1), seed=st.integers(0, 10**6))
def test_any_split_merges_to_the_same_result(bounds, which, seed):
    objective = OBJECTIVES[which]
    rows = initial_rows(seed, 0, N, D, normalize=True)
    feats = unit(B, D, seed)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, N, (B,), generator=g)
    shared = getattr(objective, "shared_noise", False)
    explicit = torch.randint(0, N, (K,) if shared else (B, K), generator=g)
    spec = NoiseSpec(K, shared, seed, explicit if objective.sampled else None)
    whole = sharded_step([0, N], rows, feats, ids, objective, spec)
    split = sharded_step(bounds, rows, feats, ids, objective, spec)
    torch.testing.assert_close(split[0], whole[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(split[1], whole[1], rtol=1e-5, atol=1e-6)
    if whole[2] is not None:
        # Scores are float32 (s up to 1/τ); exp turns their ~1e-6 absolute rounding,
        # which depends on how a shard blocks its matmul, into ~1e-6 relative error.
        assert split[2] == pytest.approx(whole[2], rel=1e-5)


@settings(max_examples=20, deadline=None)
@given(bounds=splits(), seed=st.integers(0, 10**6), shared=st.booleans())
def test_drawn_noise_counts_and_ranges(bounds, seed, shared):
    spec = NoiseSpec(K, shared, seed)
    counts = shard_counts(spec, B, bounds)
    assert counts.shape == ((1 if shared else B), len(bounds) - 1)
    assert (counts.sum(axis=1) == K).all()
    for s in range(len(bounds) - 1):
        share = local_noise(spec, B, bounds, s)
        valid = share.valid if share.valid is not None else torch.ones_like(share.ids, dtype=bool)
        assert torch.equal(valid.sum(1), torch.from_numpy(counts[:, s]))
        real = share.ids[valid]
        assert bool(((real >= bounds[s]) & (real < bounds[s + 1])).all())
        again = local_noise(spec, B, bounds, s)
        assert torch.equal(again.ids, share.ids)


def test_drawn_noise_union_is_uniform():
    """Chi-square check that the union over 3 unequal shards is uniform on [0, N)."""
    bounds = [0, 20, 130, N]
    hist = np.zeros(N)
    for seed in range(40):
        spec = NoiseSpec(K, False, seed)
        for s in range(3):
            share = local_noise(spec, 50, bounds, s)
            valid = share.valid if share.valid is not None else torch.ones_like(share.ids, bool)
            hist += np.bincount(share.ids[valid].numpy(), minlength=N)
    expected = hist.sum() / N
    chi2 = ((hist - expected) ** 2 / expected).sum()
    # N-1 = 199 degrees of freedom: mean 199, sd ~20; 300 is > 5 sd
    assert chi2 < 300, chi2


def test_softmax_chunking_does_not_change_the_result():
    rows = initial_rows(1, 0, 1000, D, normalize=True)
    feats = unit(B, D, 1)
    full = softmax_stats_all(rows, feats, 0.07, budget=1 << 30)
    tiny = softmax_stats_all(rows, feats, 0.07, budget=4 * B * 2 * 7)  # 7 rows per chunk
    lse_full = full[0] + full[1].log()
    lse_tiny = tiny[0] + tiny[1].log()
    torch.testing.assert_close(lse_tiny, lse_full)
    torch.testing.assert_close(tiny[2] / tiny[1][:, None], full[2] / full[1][:, None])


def test_partial_stats_size_does_not_depend_on_k_or_n():
    feats = unit(B, D, 0)
    ids = torch.arange(B)
    sizes = set()
    for n, k in [(100, 10), (100, 90), (5000, 10), (5000, 4000)]:
        shard = BankShard(initial_rows(0, 0, n, D), 0, 0.5)
        spec = NoiseSpec(k, False, 0)
        for obj in (NCE(num_negatives=k), SampledSoftmax(num_negatives=k)):
            part = shard.statistics(feats, ids, obj, local_noise(spec, B, [0, n], 0), 1.0, n)
            sizes.add((obj.kind, part.nbytes()))
    assert len(sizes) == 2


def test_positive_rows_need_each_position_exactly_once():
    rows = torch.arange(4 * D, dtype=torch.float32).view(4, D)
    feats = unit(4, D, 3)
    shards = [BankShard(rows[:2], 0, 0.5), BankShard(rows[2:], 2, 0.5)]
    ids = torch.tensor([3, 0, 2, 1])
    parts = [sh.statistics(feats, ids, Softmax(), None, None, 4) for sh in shards]
    assert torch.equal(positive_rows(parts, 4, D), rows[ids])
    with pytest.raises(RuntimeError, match="exactly once"):
        positive_rows(parts[:1], 4, D)  # two positives missing
    with pytest.raises(RuntimeError, match="exactly once"):
        positive_rows([parts[0], parts[0], parts[1]], 4, D)  # two returned twice
