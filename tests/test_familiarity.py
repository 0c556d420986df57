"""``/classify`` says when a query is far from the training data: the bank's nearest-row
scale against a brute-force reference, the sampling pass-through, and the note itself."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from generated_images import colour_class_folder

from featurestore.knn.index import KnnIndex
from knn_service.familiarity import PER_BATCH, SAMPLE, NearestScale, SampledRows, far_note
from knn_service.query_engine import KnnService
from knn_service.request_parsing import parse_query
from knn_service.train_labels import TrainLabels
from trainer.shards.make import make_shards

DIM = 8


def _batches(rows: torch.Tensor, size: int) -> list[pa.RecordBatch]:
    out = []
    for start in range(0, len(rows), size):
        part = rows[start : start + size]
        vectors = pa.FixedSizeListArray.from_arrays(pa.array(part.flatten().numpy()), DIM)
        ids = pa.array(np.arange(start, start + len(part)))
        out.append(pa.RecordBatch.from_arrays([ids, vectors], ["id", "vector"]))
    return out


def _clusters(n: int, classes: int, seed: int, spread: float = 0.05) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(classes, DIM, generator=g), dim=1)
    rows = centres[torch.arange(n) % classes] + spread * torch.randn(n, DIM, generator=g)
    return F.normalize(rows, dim=1)


def test_the_nearest_scale_matches_a_brute_force_reference():
    rows = _clusters(300, 3, seed=0)
    index = KnnIndex.from_batches(_batches(rows, 64), dim=DIM)
    ids = np.arange(0, 300, 7)
    scale = NearestScale.measure(index, ids, rows[ids].numpy())
    sims = rows[ids] @ rows.T  # [S, N]
    sims[torch.arange(len(ids)), torch.as_tensor(ids)] = -2  # not the row itself
    best = sims.max(dim=1).values.numpy()
    assert scale.rows == len(ids)
    assert scale.p01 == pytest.approx(float(np.quantile(best, 0.01)), abs=1e-5)
    assert scale.median == pytest.approx(float(np.median(best)), abs=1e-5)
    assert NearestScale.measure(index, ids[:0], rows[:0].numpy()) is None


def test_sampling_passes_every_batch_through_unchanged_and_draws_a_bounded_seeded_sample():
    rows = _clusters(3 * PER_BATCH + 10, 2, seed=1)
    batches = _batches(rows, PER_BATCH + 100)
    sampled = SampledRows(batches, DIM)
    assert list(sampled) == batches
    ids, vectors = sampled.sample()
    assert len(ids) <= min(SAMPLE, 4 * PER_BATCH) and len(np.unique(ids)) == len(ids)
    np.testing.assert_allclose(vectors, rows[ids].numpy(), atol=1e-6)
    again, _ = SampledRows(batches, DIM).sample()
    assert len(again) == 0  # nothing passed through yet
    big = SampledRows(_batches(_clusters(10 * PER_BATCH, 2, seed=2), PER_BATCH), DIM)
    list(big)
    first, second = big.sample(seed=3)[0], big.sample(seed=3)[0]
    assert len(first) == SAMPLE and np.array_equal(first, second)


def test_the_note_appears_only_below_the_first_percentile():
    scale = NearestScale(p01=0.6, median=0.9, rows=100)
    assert far_note(0.6, scale) is None and far_note(0.95, scale) is None
    note = far_note(0.2, scale)
    assert "far from the training data" in note and "0.200" in note and "0.600" in note
    assert far_note(0.1, None) is None


def test_classify_flags_a_query_far_from_every_training_image(tmp_path):
    src = colour_class_folder(tmp_path / "src", 48, seed=0, classes=3)
    make_shards(src, tmp_path / "shards", shard_size=20, progress=False)
    train = TrainLabels.load(tmp_path / "shards")
    rows = _clusters(48, 3, seed=4)  # bank row i in cluster i % 3, as the labels
    service = KnnService(lambda: _batches(rows, 16), dim=DIM, train=train)
    service.refresh()
    health = service.health()["nearest_similarity"]
    assert 0.9 < health["p01"] <= health["median"] <= 1.0

    near = rows[5] + 0.01 * torch.randn(DIM, generator=torch.Generator().manual_seed(5))
    far = torch.linalg.svd(rows, full_matrices=True).Vh[-1]  # the direction the bank spans least
    query = parse_query({"vectors": [near.tolist(), far.tolist()], "k": 5}, DIM, classify=True)
    close, distant = service.classify(query)["predictions"]
    assert close["note"] is None and close["nearest_similarity"] > health["p01"]
    assert distant["nearest_similarity"] < health["p01"]
    assert distant["note"].startswith("far from the training data")
    assert distant["class"] is not None  # still answered: the note is a hint, not a refusal
