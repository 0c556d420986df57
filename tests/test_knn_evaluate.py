"""knn_evaluate / knn_predict against a plain brute-force reference of the lemniscate kNN."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from featurestore.knn import KnnIndex, knn_evaluate, knn_predict


def reference_knn(train_f, train_y, test_f, test_y, num_classes, k, sigma, chunk=100):
    """Brute force, as the reference evaluation: chunked matmul, topk, one-hot, exp weights."""
    top1 = top5 = 0
    all_probs = []
    for s in range(0, test_f.shape[0], chunk):
        f = test_f[s : s + chunk]
        b = f.shape[0]
        dist = torch.mm(f, train_f.t())
        yd, yi = dist.topk(k, dim=1, largest=True, sorted=True)
        retrieval = torch.gather(train_y.view(1, -1).expand(b, -1), 1, yi)
        one_hot = torch.zeros(b * k, num_classes).scatter_(1, retrieval.view(-1, 1), 1)
        yd_transform = yd.clone().div_(sigma).exp_()
        probs = torch.sum(
            torch.mul(one_hot.view(b, -1, num_classes), yd_transform.view(b, -1, 1)), 1
        )
        _, predictions = probs.sort(1, True)
        correct = predictions.eq(test_y[s : s + chunk].view(-1, 1))
        top1 += int(correct[:, 0:1].sum())
        top5 += int(correct[:, :5].sum())
        all_probs.append(probs)
    n = test_f.shape[0]
    return {"top1": top1 / n, "top5": top5 / n}, torch.cat(all_probs)


def clustered(n: int, num_classes: int, d: int, noise: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    centers = torch.nn.functional.normalize(
        torch.randn(num_classes, d, generator=torch.Generator().manual_seed(99)), dim=1
    )
    labels = torch.randint(0, num_classes, (n,), generator=g)
    feats = centers[labels] + noise * torch.randn(n, d, generator=g)
    return torch.nn.functional.normalize(feats, dim=1), labels


TRAIN_F, TRAIN_Y = clustered(800, 12, 16, noise=0.6, seed=0)
TEST_F, TEST_Y = clustered(230, 12, 16, noise=0.6, seed=1)


@pytest.mark.parametrize(("k", "sigma"), [(200, 0.07), (20, 0.1), (1, 0.07)])
def test_matches_reference_on_features(k: int, sigma: float) -> None:
    expected, probs = reference_knn(TRAIN_F, TRAIN_Y, TEST_F, TEST_Y, 12, k, sigma)
    assert 0.2 < expected["top1"] < 0.98  # neither trivial nor hopeless
    got = knn_evaluate(TRAIN_F, TRAIN_Y, TEST_F, TEST_Y, k=k, temperature=sigma)
    assert got == expected
    scores = knn_predict(TRAIN_F, TRAIN_Y, TEST_F, num_classes=12, k=k, temperature=sigma)
    assert scores.shape == (230, 12)
    assert torch.allclose(scores, probs, rtol=1e-6, atol=0)
    assert torch.equal(scores.argmax(1), probs.argmax(1))


@pytest.mark.parametrize("chunk_size", [1, 37, 10_000])
def test_matches_reference_with_index_and_permuted_ids(chunk_size: int) -> None:
    expected, _ = reference_knn(TRAIN_F, TRAIN_Y, TEST_F, TEST_Y, 12, 200, 0.07)
    perm = torch.randperm(800, generator=torch.Generator().manual_seed(3))
    labels_by_id = torch.full((2000,), -1, dtype=torch.long)
    ids = perm * 2 + 5  # sparse ids into a longer label table
    labels_by_id[ids] = TRAIN_Y[perm]
    for kind in ("flat", "ivf"):
        index = KnnIndex(dim=16, kind=kind, nlist=8, nprobe=8)
        index.add(TRAIN_F[perm][:300], ids=ids[:300])
        index.add(TRAIN_F[perm][300:], ids=ids[300:])
        got = knn_evaluate(
            index, labels_by_id, TEST_F, TEST_Y, num_classes=12, chunk_size=chunk_size
        )
        assert got == expected


def test_unknown_train_labels_get_no_vote() -> None:
    train_y = TRAIN_Y.clone()
    train_y[::4] = -1
    scores = knn_predict(TRAIN_F, train_y, TEST_F, num_classes=12, k=50)
    # reference: same neighbours, unknown ones weighted 0
    yd, yi = (TEST_F @ TRAIN_F.t()).topk(50, dim=1)
    weights = yd.div(0.07).exp() * (train_y[yi] >= 0)
    expected = torch.zeros(230, 12).scatter_add_(1, train_y[yi].clamp(min=0), weights)
    assert torch.allclose(scores, expected, rtol=1e-6, atol=0)


def test_few_classes_top5_and_numpy_input() -> None:
    train_y, test_y = TRAIN_Y % 3, TEST_Y % 3
    expected, _ = reference_knn(TRAIN_F, train_y, TEST_F, test_y, 3, 200, 0.07)
    got = knn_evaluate(TRAIN_F.numpy(), train_y.numpy(), TEST_F.numpy(), test_y.numpy())
    assert got == expected
    assert got["top5"] == 1.0  # top-min(5, C) with C = 3 contains every class


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"test_labels": torch.full((230,), -1)}, "test_labels"),
        ({"test_labels": TEST_Y[:10]}, "test_labels has 10"),
        ({"train_labels": TRAIN_Y[:10]}, "train_labels has 10"),
        ({"train_labels": TRAIN_Y.float()}, "integer"),
        ({"train_labels": TRAIN_Y - 2}, "train_labels"),
        ({"test_features": TEST_F[:0], "test_labels": TEST_Y[:0]}, "empty"),
        ({"test_features": TEST_F[0]}, "test_features"),
        ({"num_classes": 5}, "num_classes=5"),
        ({"num_classes": 0}, "num_classes"),
        ({"k": 801}, "larger than the number of vectors"),
        ({"k": 0}, "k must be"),
        ({"temperature": -1.0}, "temperature"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"index_or_train_features": TRAIN_F[0]}, "2-D"),
    ],
)
def test_bad_input(kwargs, match) -> None:
    args = {
        "index_or_train_features": TRAIN_F,
        "train_labels": TRAIN_Y,
        "test_features": TEST_F,
        "test_labels": TEST_Y,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        knn_evaluate(**args)


def test_index_ids_must_index_labels() -> None:
    index = KnnIndex(dim=16)
    index.add(TRAIN_F, ids=np.arange(800) + 1000)
    with pytest.raises(ValueError, match="train_labels has only 800"):
        knn_evaluate(index, TRAIN_Y, TEST_F, TEST_Y)
