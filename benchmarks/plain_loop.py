"""A plain single-process NPID loop written the reference code's way (lemniscate.pytorch).

The yardstick for ``bench_learning.py``: torchvision ``ImageFolder`` + ``DataLoader``
(shuffle, worker processes, PIL augmentation), the memory bank as one tensor, the exact
non-parametric softmax as ``F.cross_entropy(f @ bank.T / τ, ids)`` through autograd (or
NCE / sampled softmax written out the same plain way), and the momentum update after the
optimizer step. It shares with the project only what defines "the same recipe": the
encoder constructors and the augmentation presets. Nothing here uses Ray, the feature
store, the shard loader or the project's kNN code.

    python benchmarks/plain_loop.py --train .data/cifar10/train --test .data/cifar10/test \\
        --arch small --epochs 12 --out plain.jsonl
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from trainer.data.transforms import build_transform
from trainer.model.encoders import build_encoder

logger = logging.getLogger("plain_loop")


@dataclass
class PlainRecipe:
    """The settings both sides of ``bench_learning.py`` share."""

    arch: str = "small"
    low_dim: int = 128
    epochs: int = 12
    batch_size: int = 256
    lr: float = 0.03
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "step"
    warmup_epochs: int = 0
    temperature: float = 0.07
    bank_momentum: float = 0.5
    objective: str = "softmax"
    """softmax (exact) | nce | sampled-softmax"""
    nce_k: int = 4096
    z_momentum: float | None = None
    """NCE: None keeps Z from the first batch (the reference); m re-estimates it each step."""
    seed: int = 0
    preset: str = "cifar"
    knn_k: int = 200
    num_workers: int = 2


class IndexedImageFolder(ImageFolder):
    """ImageFolder returning ``(image, label, index)``, as the reference's CIFAR10Instance."""

    def __getitem__(self, index: int):
        image, label = super().__getitem__(index)
        return image, label, index


def learning_rate(recipe: PlainRecipe, epoch: int) -> float:
    """Step (×0.1 at 40/60/80 %) or cosine, with an optional linear warm-up (per epoch)."""
    if epoch < recipe.warmup_epochs:
        return recipe.lr * (epoch + 1) / recipe.warmup_epochs
    if recipe.schedule == "cosine":
        return 0.5 * recipe.lr * (1 + math.cos(math.pi * epoch / recipe.epochs))
    drops = sum(
        1 for f in (0.4, 0.6, 0.8) if int(f * recipe.epochs) > 0 and epoch >= int(f * recipe.epochs)
    )
    return recipe.lr * 0.1**drops


def npid_loss(f, bank, idx, recipe: PlainRecipe, gen: torch.Generator, z: list) -> torch.Tensor:
    """The batch loss through autograd, as the reference computes it."""
    tau, n = recipe.temperature, bank.shape[0]
    if recipe.objective == "softmax":
        return F.cross_entropy(f @ bank.T / tau, idx)
    k = recipe.nce_k
    noise = torch.randint(0, n, (f.shape[0], k), generator=gen)
    rows = bank[torch.cat([idx.unsqueeze(1), noise], dim=1)]  # [B, 1+K, d]
    s = torch.bmm(rows, f.unsqueeze(2)).squeeze(2) / tau  # [B, 1+K]
    if recipe.objective == "sampled-softmax":
        return F.cross_entropy(s, torch.zeros(f.shape[0], dtype=torch.long))
    p = torch.exp(s)
    observed = float(p.mean().detach()) * n
    if not z:  # the reference: Z from the first batch, then fixed
        z.append(observed)
    p = p / z[0]
    if recipe.z_momentum is not None:  # for the next step, as the trainer's --nce-z ema
        z[0] = recipe.z_momentum * z[0] + (1 - recipe.z_momentum) * observed
    c = k / n
    eps = 1e-7
    lp = torch.log(p[:, 0] / (p[:, 0] + c + eps))
    ln = torch.log(c / (p[:, 1:] + c + eps)).sum(dim=1)
    return -(lp + ln).mean()


@torch.no_grad()
def encode(model, dataset, batch_size: int, num_workers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (test transform) and labels of a whole dataset, in its order."""
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    feats, labels = [], []
    for x, y, _ in loader:
        feats.append(F.normalize(model(x), dim=1))
        labels.append(y)
    model.train()
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_top1(train, train_y, test, test_y, k: int, sigma: float, classes: int) -> float:
    """The reference's weighted kNN (lemniscate ``test.kNN``): top-1 as a fraction."""
    correct = 0
    for i in range(0, test.shape[0], 1000):
        sims, nn_idx = (test[i : i + 1000] @ train.T).topk(k, dim=1)
        weights = (sims / sigma).exp()
        onehot = torch.zeros(nn_idx.shape[0], k, classes).scatter_(
            2, train_y[nn_idx].unsqueeze(2), 1
        )
        scores = (onehot * weights.unsqueeze(2)).sum(dim=1)
        correct += int((scores.argmax(dim=1) == test_y[i : i + 1000]).sum())
    return correct / test.shape[0]


def run(train_dir: str, test_dir: str, recipe: PlainRecipe, out: Path | None = None) -> list[dict]:
    """Train; one record per evaluation (epoch 0 recomputed, each epoch the bank, the last
    line recomputed), as the trainer's ``metrics.jsonl``."""
    torch.manual_seed(recipe.seed)
    train_tf = build_transform(recipe.preset, train=True)
    test_tf = build_transform(recipe.preset, train=False)
    train_set = IndexedImageFolder(train_dir, transform=train_tf)
    train_eval = IndexedImageFolder(train_dir, transform=test_tf)
    test_set = IndexedImageFolder(test_dir, transform=test_tf)
    n, classes = len(train_set), len(train_set.classes)
    model = build_encoder(recipe.arch, recipe.low_dim)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay
    )
    gen = torch.Generator().manual_seed(recipe.seed)
    a = 1.0 / math.sqrt(recipe.low_dim / 3)
    bank = torch.rand(n, recipe.low_dim, generator=gen) * 2 * a - a  # the reference's init
    train_y = torch.tensor(train_set.targets)
    loader = DataLoader(
        train_set,
        batch_size=recipe.batch_size,
        shuffle=True,
        num_workers=recipe.num_workers,
        drop_last=False,
        persistent_workers=recipe.num_workers > 0,
        generator=torch.Generator().manual_seed(recipe.seed),
    )
    records: list[dict] = []

    def record(r: dict) -> None:
        records.append(r)
        logger.info("plain %s", json.dumps(r))
        if out is not None:
            with open(out, "a") as fh:
                fh.write(json.dumps(r) + "\n")

    bs, nw = 512, recipe.num_workers
    test_f, test_y = encode(model, test_set, bs, nw)
    train_f, _ = encode(model, train_eval, bs, nw)
    top1 = knn_top1(train_f, train_y, test_f, test_y, recipe.knn_k, recipe.temperature, classes)
    record({"epoch": 0, "loss": None, "knn_top1": top1, "features": "recomputed", "seconds": 0.0})
    z: list[float] = []
    start = time.perf_counter()
    for epoch in range(recipe.epochs):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(recipe, epoch)
        total, count = 0.0, 0
        for x, _y, idx in loader:
            f = F.normalize(model(x), dim=1)
            loss = npid_loss(f, bank, idx, recipe, gen, z)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            with torch.no_grad():  # the momentum update, against the scored (old) rows
                new = bank[idx] * recipe.bank_momentum + f.detach() * (1 - recipe.bank_momentum)
                bank[idx] = F.normalize(new, dim=1)
            total, count = total + float(loss.detach()) * len(idx), count + len(idx)
        test_f, test_y = encode(model, test_set, bs, nw)
        top1 = knn_top1(bank, train_y, test_f, test_y, recipe.knn_k, recipe.temperature, classes)
        record(
            {
                "epoch": epoch + 1,
                "loss": total / count,
                "knn_top1": top1,
                "features": "bank",
                "seconds": time.perf_counter() - start,
            }
        )
    train_f, _ = encode(model, train_eval, bs, nw)
    top1 = knn_top1(train_f, train_y, test_f, test_y, recipe.knn_k, recipe.temperature, classes)
    record(
        {
            "epoch": recipe.epochs,
            "loss": None,
            "knn_top1": top1,
            "features": "recomputed",
            "seconds": time.perf_counter() - start,
        }
    )
    return records


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", required=True, help="ImageFolder root of the training split")
    p.add_argument("--test", required=True, help="ImageFolder root of the test split")
    p.add_argument("--out", type=Path, help="append one JSON line per evaluation here")
    for name, value in asdict(PlainRecipe()).items():
        kind = float if value is None else type(value)
        p.add_argument(f"--{name.replace('_', '-')}", type=kind, default=value)
    args = vars(p.parse_args(argv))
    train, test, out = args.pop("train"), args.pop("test"), args.pop("out")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run(train, test, PlainRecipe(**args), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
