"""MemoryBank and the objectives against plain autograd references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from reference import (
    bad_step_cases,
    momentum_update_reference,
    nce_reference,
    sampled_softmax_reference,
    softmax_reference,
    unit,
)

from featurestore import NCE, MemoryBank, SampledSoftmax, Softmax
from featurestore.bank_shard import initial_rows
from featurestore.objectives import Objective

N, D, B, K = 500, 16, 12, 40


def make_batch(seed: int = 0, b: int = B, n: int = N):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randperm(n, generator=g)[:b]
    noise = torch.randint(0, n, (b, K), generator=g)
    return unit(b, D, seed + 100), ids, noise


def close(a, b, tol=2e-5):
    torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)


def test_initial_rows_reference_uniform_and_shard_independent():
    rows = initial_rows(3, 0, 1000, 128)
    a = 1 / math.sqrt(128 / 3)
    assert rows.shape == (1000, 128)
    assert float(rows.abs().max()) <= a
    assert float(rows.min()) < -0.9 * a and float(rows.max()) > 0.9 * a
    # any [lo, hi) slice equals the same rows generated alone
    torch.testing.assert_close(initial_rows(3, 123, 777, 128), rows[123:777], rtol=0, atol=0)
    normed = initial_rows(3, 0, 10, 128, normalize=True)
    torch.testing.assert_close(normed.norm(dim=1), torch.ones(10))
    bank = MemoryBank(1000, 128, seed=3)
    torch.testing.assert_close(bank.get(torch.arange(1000)), rows, rtol=0, atol=0)


@pytest.mark.parametrize("prox", [0.0, 0.3])
@pytest.mark.parametrize("shared", [False, True])
def test_nce_matches_reference_including_first_step_z(prox, shared):
    bank = MemoryBank(N, D, seed=1)
    rows0 = bank.get(torch.arange(N)).clone()
    f, ids, noise = make_batch(1)
    if shared:
        noise = noise[0]
    obj = NCE(num_negatives=K, temperature=0.07, prox_lambda=prox, shared_noise=shared)
    out = bank.step(f, ids, obj, noise_ids=noise)
    full_noise = noise.expand(B, -1) if shared else noise
    loss, grad, z = nce_reference(rows0, f, ids, full_noise, 0.07, None, prox_lambda=prox)
    assert out.z == pytest.approx(z, rel=1e-5)
    assert bank.z == pytest.approx(z, rel=1e-5)
    close(out.loss, loss)
    close(out.grad, grad)
    close(bank.get(torch.arange(N)), momentum_update_reference(rows0, ids, f, 0.5))
    # second step reuses the first step's Z
    rows1 = bank.get(torch.arange(N)).clone()
    f2, ids2, noise2 = make_batch(2)
    if shared:
        noise2 = noise2[0]
    out2 = bank.step(f2, ids2, obj, noise_ids=noise2)
    full2 = noise2.expand(B, -1) if shared else noise2
    loss2, grad2, _ = nce_reference(rows1, f2, ids2, full2, 0.07, z, prox_lambda=prox)
    assert out2.z == pytest.approx(z, rel=1e-5)
    close(out2.loss, loss2)
    close(out2.grad, grad2)


def _reference_z(rows, f, ids, noise, temperature=0.07):
    """``N · mean(exp(s))`` over the batch's positives and noise (the reference estimate)."""
    idx = torch.cat([ids.view(-1, 1), noise], dim=1)
    s = torch.bmm(rows.double()[idx], f.double().unsqueeze(2)).squeeze(2) / temperature
    return float(s.exp().mean()) * rows.shape[0]


def test_nce_z_ema_follows_each_step_one_step_late():
    """z_momentum=m: step t is scored with Z_t; then Z_{t+1} = m·Z_t + (1-m)·N·mean(exp(s_t))."""
    m = 0.9
    bank = MemoryBank(N, D, seed=5)
    obj = NCE(num_negatives=K, z_momentum=m)
    z = None
    for t in range(4):
        rows = bank.get(torch.arange(N)).clone()
        f, ids, noise = make_batch(10 + t)
        out = bank.step(f, ids, obj, noise_ids=noise)
        observed = _reference_z(rows, f, ids, noise)
        if z is None:
            z = observed  # the first step estimates Z as the fixed-Z NCE does
        loss, grad, _ = nce_reference(rows, f, ids, noise, 0.07, z)
        assert out.z == pytest.approx(z, rel=1e-5)
        close(out.loss, loss)
        close(out.grad, grad)
        z = m * z + (1 - m) * observed
        assert bank.z == pytest.approx(z, rel=1e-5)
    state = bank.state_dict()
    again = MemoryBank(N, D, seed=5)
    again.load_state_dict(state)
    assert again.z == bank.z  # Z travels with the bank's state


def test_nce_z_momentum_is_checked():
    with pytest.raises(ValueError, match="z_momentum"):
        NCE(z_momentum=1.0)
    with pytest.raises(ValueError, match="cannot be combined"):
        NCE(z=3.0, z_momentum=0.99)
    assert NCE(z_momentum=0.99).tracks_z and not NCE().tracks_z


def test_nce_fixed_z_from_objective():
    bank = MemoryBank(N, D, seed=2)
    rows0 = bank.get(torch.arange(N)).clone()
    f, ids, noise = make_batch(3)
    out = bank.step(f, ids, NCE(num_negatives=K, z=1234.5), noise_ids=noise)
    loss, grad, _ = nce_reference(rows0, f, ids, noise, 0.07, 1234.5)
    assert out.z == 1234.5 and bank.z is None
    close(out.loss, loss)
    close(out.grad, grad)


@pytest.mark.parametrize("prox", [0.0, 0.5])
@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_softmax_matches_reference(prox, temperature):
    bank = MemoryBank(N, D, seed=4, memory_budget=4096)  # forces many row chunks
    rows0 = bank.get(torch.arange(N)).clone()
    f, ids, _ = make_batch(4)
    out = bank.step(f, ids, Softmax(temperature=temperature, prox_lambda=prox))
    loss, grad = softmax_reference(rows0, f, ids, temperature, prox)
    close(out.loss, loss)
    close(out.grad, grad)
    close(bank.get(torch.arange(N)), momentum_update_reference(rows0, ids, f, 0.5))


@pytest.mark.parametrize("shared", [False, True])
def test_sampled_softmax_matches_reference(shared):
    bank = MemoryBank(N, D, seed=5)
    rows0 = bank.get(torch.arange(N)).clone()
    f, ids, noise = make_batch(5)
    obj = SampledSoftmax(num_negatives=K, temperature=0.1, prox_lambda=0.2, shared_noise=shared)
    out = bank.step(f, ids, obj, noise_ids=noise[0] if shared else noise)
    loss, grad = sampled_softmax_reference(
        rows0, f, ids, noise[0].expand(B, -1) if shared else noise, 0.1, 0.2
    )
    close(out.loss, loss)
    close(out.grad, grad)


@pytest.mark.parametrize("obj", [NCE(num_negatives=K), SampledSoftmax(num_negatives=K)])
def test_drawn_noise_is_deterministic_per_seed(obj):
    f, ids, _ = make_batch(6)
    a = MemoryBank(N, D, seed=7).step(f, ids, obj)
    b = MemoryBank(N, D, seed=7).step(f, ids, obj)
    c = MemoryBank(N, D, seed=7).step(f, ids, obj, seed=99)
    assert torch.equal(a.grad, b.grad)
    assert not torch.equal(a.grad, c.grad)


def test_step_async_is_step_already_finished():
    f, ids, _ = make_batch(8)
    obj = SampledSoftmax(num_negatives=K)
    a, b = MemoryBank(N, D, seed=5), MemoryBank(N, D, seed=5)
    want = a.step(f, ids, obj)
    pending = b.step_async(f, ids, obj)
    assert b.step_count == 1  # applied before result() is asked for
    got = pending.result()
    assert got is pending.result()  # the same output every time
    assert torch.equal(got.grad, want.grad) and torch.equal(b.rows, a.rows)
    with pytest.raises(ValueError, match="out of range"):
        b.step_async(f, ids + N, obj)  # bad input raises at once, not in result()


def test_grad_drives_encoder_like_autograd():
    """feats.backward(out.grad) gives the same parameter grads as the reference loss."""
    torch.manual_seed(0)
    enc = torch.nn.Linear(8, D)
    x = torch.randn(B, 8)
    bank = MemoryBank(N, D, seed=8)
    rows0 = bank.get(torch.arange(N)).clone()
    _, ids, _ = make_batch(8)
    feats = F.normalize(enc(x), dim=1)
    out = bank.step(feats, ids, Softmax(temperature=0.1))
    feats.backward(out.grad)
    got = enc.weight.grad.clone()
    enc.zero_grad()
    feats = F.normalize(enc(x), dim=1)
    F.cross_entropy(feats @ rows0.T / 0.1, ids).backward()
    close(got, enc.weight.grad, tol=1e-4)


def test_update_and_set_and_get_with_duplicates():
    bank = MemoryBank(50, 4, momentum=0.25, seed=0)
    rows0 = bank.get(torch.arange(50)).clone()
    ids = torch.tensor([3, 7, 3])
    feats = unit(3, 4, 1)
    bank.update(ids, feats)
    # last occurrence wins, computed from the old row
    expect = momentum_update_reference(rows0, torch.tensor([7, 3]), feats[1:], 0.25)
    close(bank.get(torch.arange(50)), expect)
    bank.set(torch.tensor([1, 2]), torch.ones(2, 4))
    close(bank.get(torch.tensor([2, 1])), torch.ones(2, 4))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_storage_math_in_float32(dtype):
    bank = MemoryBank(N, D, seed=9, dtype=dtype)
    assert bank.rows.dtype == getattr(torch, dtype)
    rows0 = bank.get(torch.arange(N)).clone()  # the stored values, upcast
    assert rows0.dtype == torch.float32
    f, ids, noise = make_batch(9)
    out = bank.step(f, ids, NCE(num_negatives=K), noise_ids=noise)
    loss, grad, _ = nce_reference(rows0, f, ids, noise, 0.07, None)
    close(out.loss, loss)
    close(out.grad, grad)
    out = bank.step(f, ids, Softmax())
    assert out.grad.dtype == torch.float32


def test_sample_and_export():
    bank = MemoryBank(300, D, seed=10)
    ids, rows = bank.sample(1000, seed=1)
    assert ids.shape == (1000,) and rows.shape == (1000, D)
    assert int(ids.min()) >= 0 and int(ids.max()) < 300
    torch.testing.assert_close(rows, bank.get(ids))
    batches = list(bank.export(batch_rows=128))
    assert [b.num_rows for b in batches] == [128, 128, 44]
    from featurestore.arrow_io import from_record_batch

    got = torch.cat([from_record_batch(b)[1] for b in batches])
    torch.testing.assert_close(got, bank.get(torch.arange(300)))


def test_state_dict_roundtrip():
    bank = MemoryBank(100, D, seed=11)
    f, ids, noise = make_batch(11, n=100)
    bank.step(f, ids, NCE(num_negatives=K), noise_ids=noise)
    other = MemoryBank(100, D, seed=11)
    other.load_state_dict(bank.state_dict())
    assert other.z == bank.z and other.step_count == 1
    torch.testing.assert_close(other.rows, bank.rows)
    with pytest.raises(ValueError, match="shape"):
        MemoryBank(99, D).load_state_dict(bank.state_dict())


def _bad_step_cases():
    return bad_step_cases(*make_batch(12), N, K)


@pytest.mark.parametrize("case", range(len(_bad_step_cases())))
def test_bad_step_input_raises_and_leaves_bank_unchanged(case):
    message, kwargs = _bad_step_cases()[case]
    bank = MemoryBank(N, D, seed=12)
    before = bank.rows.clone()
    with pytest.raises(ValueError, match=message):
        bank.step(**kwargs)
    assert torch.equal(bank.rows, before)
    assert bank.z is None and bank.step_count == 0


def test_bad_get_set_update_and_constructor():
    bank = MemoryBank(10, 4)
    before = bank.rows.clone()
    with pytest.raises(ValueError, match="out of range"):
        bank.get(torch.tensor([10]))
    with pytest.raises(ValueError, match="rows"):
        bank.set(torch.tensor([1]), torch.ones(2, 4))
    with pytest.raises(ValueError, match="non-finite"):
        bank.update(torch.tensor([1]), torch.full((1, 4), math.nan))
    assert torch.equal(bank.rows, before)
    with pytest.raises(ValueError, match="num_rows"):
        MemoryBank(0, 4)
    with pytest.raises(ValueError, match="momentum"):
        MemoryBank(10, 4, momentum=1.5)
    with pytest.raises(ValueError, match="dtype"):
        MemoryBank(10, 4, dtype="int8")


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: NCE(num_negatives=0), "num_negatives"),
        (lambda: NCE(temperature=0), "temperature"),
        (lambda: Softmax(prox_lambda=-1), "prox_lambda"),
        (lambda: NCE(z=-3.0), "z must"),
        (lambda: SampledSoftmax(num_negatives=2.5), "num_negatives"),
        (lambda: Objective.from_dict({"kind": "nope"}), "unknown objective"),
    ],
)
def test_objective_config_errors(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_objective_dict_roundtrip():
    for obj in (NCE(num_negatives=7, z=2.0), Softmax(temperature=0.2), SampledSoftmax()):
        assert Objective.from_dict(obj.to_dict()) == obj


def test_load_state_dict_refuses_another_momentum_or_seed_and_keeps_the_rows():
    saved = MemoryBank(20, 4, momentum=0.5, seed=1).state_dict()
    for other in (MemoryBank(20, 4, momentum=0.9, seed=1), MemoryBank(20, 4, momentum=0.5, seed=2)):
        before = other.rows.clone()
        with pytest.raises(ValueError, match=r"state has (momentum 0\.5|seed 1), bank has"):
            other.load_state_dict(saved)
        assert torch.equal(other.rows, before)
    same = MemoryBank(20, 4, momentum=0.5, seed=1)
    same.load_state_dict(saved)
    assert torch.equal(same.rows, saved["rows"])
