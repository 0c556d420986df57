"""KnnIndex against brute-force torch matmul + topk; ids, Arrow input and bad input."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import featurestore.knn.backends as backend_choice
from featurestore.knn import KnnIndex


def unit(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)


def brute_force(queries: torch.Tensor, bank: torch.Tensor, k: int):
    return (queries @ bank.t()).topk(k, dim=1, largest=True, sorted=True)


BANK = unit(1500, 24, seed=0)
QUERIES = unit(40, 24, seed=1)


def assert_same_search(index: KnnIndex, queries: torch.Tensor, bank: torch.Tensor, k: int):
    sims, ids = index.search(queries, k)
    ref_sims, ref_ids = brute_force(queries, bank, k)
    assert sims.dtype == torch.float32 and ids.dtype == torch.int64
    assert sims.shape == ids.shape == (queries.shape[0], k)
    assert torch.equal(ids, ref_ids)
    assert torch.allclose(sims, ref_sims, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", ["auto", "faiss", "torch"])
@pytest.mark.parametrize("k", [1, 17, 200])
def test_flat_matches_brute_force(backend: str, k: int) -> None:
    index = KnnIndex(dim=24, kind="flat", backend=backend, device="cpu")
    index.add(BANK[:700])
    index.add(BANK[700:].numpy())  # numpy input, second call
    assert len(index) == index.ntotal == 1500
    assert_same_search(index, QUERIES, BANK, k)


@pytest.mark.parametrize("bank_block", [113, 700, 1 << 16])  # blocks with/without candidates
@pytest.mark.parametrize("k", [1, 5, 50])
def test_cpu_heap_search_across_blocks(monkeypatch, bank_block: int, k: int) -> None:
    monkeypatch.setattr(backend_choice, "_BANK_BLOCK", {"cpu": bank_block, "cuda": bank_block})
    monkeypatch.setattr(backend_choice, "_BLOCK_BUDGET", {"cpu": bank_block * 7, "cuda": 1})
    index = KnnIndex(dim=24, backend="torch", device="cpu")
    index.add(BANK)
    assert_same_search(index, QUERIES, BANK, k)


@pytest.mark.parametrize("use_faiss", [True, False])
def test_exact_search_with_tied_similarities(monkeypatch, use_faiss: bool) -> None:
    bank = BANK[:300].repeat(4, 1)  # every similarity appears 4 times
    index = KnnIndex(dim=24, backend="torch", device="cpu")
    if not use_faiss:
        monkeypatch.setattr(index._impl, "_faiss", None)
    index.add(bank)
    sims, ids = index.search(QUERIES, 30)
    ref_sims, _ = brute_force(QUERIES, bank, 30)
    assert torch.allclose(sims, ref_sims, rtol=0, atol=1e-6)
    assert torch.allclose(torch.einsum("qd,qkd->qk", QUERIES, bank[ids]), sims, atol=1e-6)
    assert all(len(set(row.tolist())) == 30 for row in ids)  # distinct neighbours


def test_torch_topk_search_without_faiss(monkeypatch, caplog) -> None:
    monkeypatch.setattr(backend_choice, "_faiss_module", None)
    monkeypatch.setattr(backend_choice, "_faiss_tried", False)
    monkeypatch.setattr(backend_choice, "_BANK_BLOCK", {"cpu": 997, "cuda": 997})
    monkeypatch.setattr(backend_choice, "_BLOCK_BUDGET", {"cpu": 997 * 9, "cuda": 997 * 9})
    monkeypatch.setitem(__import__("sys").modules, "faiss", None)  # import faiss -> ImportError
    with caplog.at_level(logging.WARNING, logger="featurestore.knn.backends"):
        index = KnnIndex(dim=24, kind="ivf", device="cpu")  # falls back to exact search
    assert index.backend == "torch"
    assert "faiss" in caplog.text
    index.add(BANK)
    assert_same_search(index, QUERIES, BANK, 150)
    with pytest.raises(ValueError, match="faiss"):
        KnnIndex(dim=24, backend="faiss")


def test_ivf_with_all_lists_probed_equals_flat() -> None:
    index = KnnIndex(dim=24, kind="ivf", nlist=16, nprobe=16)
    assert not index.is_trained
    index.add(BANK)
    assert index.is_trained and index.backend == "faiss" and index.nlist == 16
    assert_same_search(index, QUERIES, BANK, 30)


def test_flat_train_is_a_no_op() -> None:
    index = KnnIndex(dim=24)
    assert index.is_trained and index.nlist is None
    index.train(BANK)
    assert len(index) == 0


def test_ivf_default_nlist_explicit_train_and_nprobe() -> None:
    index = KnnIndex(dim=24, kind="ivf", nprobe=4)
    index.train(BANK)
    assert index.nlist == min(round(4 * 1500**0.5), 1500 // 39)
    index.add(BANK[:800])
    index.add(BANK[800:])
    sims, ids = index.search(QUERIES, 10)  # approximate: a fair share of the true neighbours
    ref_ids = brute_force(QUERIES, BANK, 10)[1]
    recall = np.mean([np.isin(r, i).mean() for r, i in zip(ref_ids.numpy(), ids.numpy())])
    assert recall > 0.2
    assert torch.all(sims[:, :-1] >= sims[:, 1:])
    index.nprobe = index.nlist
    assert_same_search(index, QUERIES, BANK, 10)
    with pytest.raises(ValueError, match="nprobe"):
        index.nprobe = 0
    with pytest.raises(ValueError, match="train"):
        index.train(BANK)


def test_ivf_missing_candidates_are_marked() -> None:
    index = KnnIndex(dim=24, kind="ivf", nlist=8, nprobe=1)
    index.add(BANK[:200])
    sims, ids = index.search(QUERIES, 150)  # one list holds fewer than 150 vectors
    missing = ids == -1
    assert missing.any()
    assert torch.all(torch.isneginf(sims[missing]))
    assert torch.all(torch.isfinite(sims[~missing]))


def test_ids_mapping_explicit_and_default() -> None:
    index = KnnIndex(dim=24)
    index.add(BANK[:500])  # ids 0..499
    explicit = torch.arange(500, 1000) * 7 + 10_000  # far from the positions
    index.add(BANK[500:1000], ids=explicit)
    index.add(BANK[1000:], ids=np.arange(1000, 1500)[::-1].copy())  # reversed
    table = torch.cat([torch.arange(500), explicit, torch.arange(1000, 1500).flip(0)])
    _, ids = index.search(QUERIES, 60)
    _, ref_pos = brute_force(QUERIES, BANK, 60)
    assert torch.equal(ids, table[ref_pos])
    index.reset()
    assert len(index) == 0
    index.add(BANK[:10])
    assert torch.equal(index.search(BANK[:3], 1)[1].flatten(), torch.arange(3))


def test_default_ids_continue_and_ids_are_checked() -> None:
    index = KnnIndex(dim=24)
    index.add(BANK[:5])
    index.add(BANK[5:8])
    assert torch.equal(index.search(BANK[:8], 1)[1].flatten(), torch.arange(8))
    with pytest.raises(ValueError, match="already in the index"):
        index.add(BANK[8:10], ids=[3, 100])
    with pytest.raises(ValueError, match="duplicates"):
        index.add(BANK[8:10], ids=[100, 100])
    with pytest.raises(ValueError, match="length 2"):
        index.add(BANK[8:10], ids=[100])
    with pytest.raises(ValueError, match=">= 0"):
        index.add(BANK[8:10], ids=[-1, 100])
    with pytest.raises(ValueError, match="integers"):
        index.add(BANK[8:10], ids=np.array([1.0, 2.0]))
    assert len(index) == 8  # failed adds leave the index unchanged


def test_add_copies_and_empty_inputs() -> None:
    bank = BANK[:300].clone()
    index = KnnIndex(dim=24)
    index.add(bank)
    index.add(torch.empty(0, 24))
    before = index.search(QUERIES, 5)
    bank.zero_()
    after = index.search(QUERIES, 5)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    sims, ids = index.search(torch.empty(0, 24), 5)
    assert sims.shape == ids.shape == (0, 5)


def arrow_batch(ids: np.ndarray, vectors: np.ndarray, fixed: bool = True) -> pa.RecordBatch:
    values = pa.array(vectors.reshape(-1))
    if fixed:
        column = pa.FixedSizeListArray.from_arrays(values, vectors.shape[1])
    else:
        offsets = pa.array(np.arange(0, vectors.size + 1, vectors.shape[1], dtype=np.int32))
        column = pa.ListArray.from_arrays(offsets, values)
    return pa.RecordBatch.from_arrays([pa.array(ids), column], names=["id", "vector"])


def test_from_batches_round_trip() -> None:
    bank = BANK.numpy()
    ids = np.arange(1500, dtype=np.int64) + 1_000_000
    batches = [
        arrow_batch(ids[:400], bank[:400]),  # fixed_size_list<float32>
        arrow_batch(ids[400:900], bank[400:900].astype(np.float16), fixed=True),
        arrow_batch(ids[900:1200], bank[900:1200], fixed=False),  # list<float>
        pa.Table.from_batches([arrow_batch(ids[1200:], bank[1200:])]),
    ]
    expected_bank = BANK.clone()
    expected_bank[400:900] = torch.from_numpy(bank[400:900].astype(np.float16).astype(np.float32))
    for kind, kwargs in [
        ("flat", {}),
        ("ivf", {"nlist": 8, "nprobe": 8, "train_size": 500}),  # trains after 2 batches
        ("ivf", {"nlist": 8, "nprobe": 8}),  # stream shorter than train_size
    ]:
        index = KnnIndex.from_batches(iter(batches), dim=24, kind=kind, **kwargs)
        assert len(index) == 1500
        sims, got = index.search(QUERIES, 25)
        ref_sims, ref_pos = brute_force(QUERIES, expected_bank, 25)
        assert torch.equal(got, torch.from_numpy(ids)[ref_pos])
        assert torch.allclose(sims, ref_sims, atol=1e-5)


def test_from_batches_sliced_batch_and_bad_batches() -> None:
    bank = BANK.numpy()
    ids = np.arange(100, dtype=np.int64)
    sliced = arrow_batch(ids, bank[:100]).slice(30, 40)  # offsets must be honoured
    index = KnnIndex.from_batches([sliced], dim=24)
    _, got = index.search(BANK[30:70], 1)
    assert torch.equal(got.flatten(), torch.arange(30, 70))

    good = arrow_batch(ids[:4], bank[:4])
    with pytest.raises(ValueError, match="'id' and 'vector'"):
        KnnIndex.from_batches([good.rename_columns(["key", "vector"])], dim=24)
    with pytest.raises(ValueError, match="dim=16"):
        KnnIndex.from_batches([good], dim=16)
    ragged = pa.RecordBatch.from_arrays(
        [pa.array([0, 1]), pa.array([[1.0] * 24, [1.0] * 23])], names=["id", "vector"]
    )
    with pytest.raises(ValueError, match="length dim"):
        KnnIndex.from_batches([ragged], dim=24)
    nulls = pa.RecordBatch.from_arrays(
        [pa.array([0, 1]), pa.array([[1.0] * 24, None], pa.list_(pa.float32(), 24))],
        names=["id", "vector"],
    )
    with pytest.raises(ValueError, match="vector"):
        KnnIndex.from_batches([nulls], dim=24)
    with pytest.raises(ValueError, match="RecordBatch"):
        KnnIndex.from_batches([bank[:4]], dim=24)
    with pytest.raises(ValueError, match="train_size"):
        KnnIndex.from_batches([good], dim=24, kind="ivf", train_size=0)


@settings(max_examples=25, deadline=None)
@given(split=st.integers(0, 40), k=st.integers(1, 300), backend=st.sampled_from(["auto", "faiss"]))
def test_property_query_chunks_give_identical_results(split: int, k: int, backend: str) -> None:
    index = KnnIndex(dim=24, backend=backend)
    index.add(BANK[:300])
    sims, ids = index.search(QUERIES, k)
    head, tail = index.search(QUERIES[:split], k), index.search(QUERIES[split:], k)
    # BLAS may round a 1-row product differently from a 40-row one: sims equal to ~1 ulp
    assert torch.allclose(torch.cat([head[0], tail[0]]), sims, rtol=0, atol=1e-6)
    assert torch.equal(torch.cat([head[1], tail[1]]), ids)
    assert torch.all(sims[:, :-1] >= sims[:, 1:])  # best first


@pytest.mark.parametrize(
    ("queries", "k", "match"),
    [
        (QUERIES, 0, "k must be"),
        (QUERIES, 301, "larger than the number of vectors"),
        (QUERIES[:, :10], 5, "24 columns"),
        (QUERIES[0], 5, "2-D"),
        (torch.full((2, 24), float("nan")), 5, "NaN or inf"),
        (torch.full((2, 24), float("inf")), 5, "NaN or inf"),
        (torch.zeros(2, 24, dtype=torch.long), 5, "floating"),
        ([[0.0] * 24], 5, "torch.Tensor or numpy"),
    ],
)
def test_search_bad_input(queries, k, match) -> None:
    index = KnnIndex(dim=24)
    index.add(BANK[:300])
    with pytest.raises(ValueError, match=match):
        index.search(queries, k)


def test_add_and_constructor_bad_input() -> None:
    index = KnnIndex(dim=24)
    with pytest.raises(ValueError, match="NaN or inf"):
        index.add(torch.full((3, 24), float("nan")))
    with pytest.raises(ValueError, match="24 columns"):
        index.add(torch.zeros(3, 8))
    with pytest.raises(ValueError, match="larger than"):
        index.search(QUERIES, 1)  # empty index
    for kwargs, match in [
        ({"dim": 0}, "dim"),
        ({"kind": "hnsw"}, "kind"),
        ({"nprobe": 0}, "nprobe"),
        ({"nlist": 0}, "nlist"),
        ({"backend": "numpy"}, "backend"),
        ({"device": "tpu"}, "device"),
        ({"kind": "ivf", "backend": "torch"}, "flat"),
    ]:
        with pytest.raises(ValueError, match=match):
            KnnIndex(**kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_device_without_gpu() -> None:
    with pytest.raises(ValueError, match="CUDA"):
        KnnIndex(dim=24, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_gpu_matches_brute_force(kind: str) -> None:
    index = KnnIndex(dim=24, kind=kind, nlist=16, nprobe=16, device="cuda")
    index.add(BANK.cuda())
    assert_same_search(index, QUERIES.cuda(), BANK, 30)
