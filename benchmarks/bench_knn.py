"""Benchmark: weighted kNN evaluation, knn_service vs the reference brute-force loop.

Reference (lemniscate.pytorch ``kNN``): for each chunk of 100 test vectors, ``torch.mm`` with
the ``[d, N]`` train features, ``topk(k)``, gather labels, one-hot ``[100·k, C]``, weights
``exp(s / σ)``, sum, sort. Ours: ``knn_evaluate`` (exact ``KnnIndex`` built from the train
features + vectorised vote), timed end to end including the index build.

    python benchmarks/bench_knn.py                      # 10k queries x 50k bank, d=128, k=200
    python benchmarks/bench_knn.py --num-train 5000 --num-test 1000 --repeats 1   # smoke run
    python benchmarks/bench_knn.py --features feats.pt  # real features (see --help)
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from featurestore.knn import KnnIndex, knn_evaluate, knn_predict


def reference_knn(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    k: int,
    sigma: float,
    batch_size: int = 100,
) -> tuple[dict[str, float], torch.Tensor]:
    """The reference evaluation loop; returns accuracies and top-1 predictions ``[Q]``."""
    train_t = train_features.t().contiguous()  # [d, N], as the reference keeps it
    top1 = top5 = 0
    predictions_top1 = []
    retrieval_one_hot = torch.zeros(k, num_classes)
    for start in range(0, test_features.shape[0], batch_size):
        features = test_features[start : start + batch_size]
        targets = test_labels[start : start + batch_size]
        b = features.shape[0]
        dist = torch.mm(features, train_t)
        yd, yi = dist.topk(k, dim=1, largest=True, sorted=True)
        candidates = train_labels.view(1, -1).expand(b, -1)
        retrieval = torch.gather(candidates, 1, yi)
        retrieval_one_hot.resize_(b * k, num_classes).zero_()
        retrieval_one_hot.scatter_(1, retrieval.view(-1, 1), 1)
        yd_transform = yd.clone().div_(sigma).exp_()
        probs = torch.sum(
            torch.mul(retrieval_one_hot.view(b, -1, num_classes), yd_transform.view(b, -1, 1)), 1
        )
        _, predictions = probs.sort(1, True)
        correct = predictions.eq(targets.view(-1, 1))
        top1 += int(correct.narrow(1, 0, 1).sum())
        top5 += int(correct.narrow(1, 0, min(5, num_classes)).sum())
        predictions_top1.append(predictions[:, 0])
    n = test_features.shape[0]
    return {"top1": top1 / n, "top5": top5 / n}, torch.cat(predictions_top1)


def clustered_data(
    num_train: int, num_test: int, dim: int, num_classes: int, noise: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unit vectors around ``num_classes`` random centres (Gaussian noise, then normalised)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.nn.functional.normalize(torch.randn(num_classes, dim, generator=g), dim=1)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(0, num_classes, (n,), generator=g)
        feats = centers[labels] + noise * torch.randn(n, dim, generator=g)
        return torch.nn.functional.normalize(feats, dim=1), labels

    train_f, train_y = draw(num_train)
    test_f, test_y = draw(num_test)
    return train_f, train_y, test_f, test_y


def load_features(path: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A ``torch.save``d dict with train_features, train_labels, test_features, test_labels."""
    data = torch.load(path, map_location="cpu")
    keys = ("train_features", "train_labels", "test_features", "test_labels")
    return tuple(data[key] for key in keys)  # type: ignore[return-value]


def timed(fn: Callable[[], object]) -> tuple[float, float, object]:
    """Wall seconds, CPU seconds (all threads) and the result of ``fn()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-train", type=int, default=50_000)
    parser.add_argument("--num-test", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--k", type=int, default=200)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--temperature", type=float, default=0.07)
    parser.add_argument("--noise", type=float, default=0.35, help="per-dim noise std")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--features", help="torch.save'd dict of train/test features+labels")
    parser.add_argument("--no-faiss-native", action="store_true", help="skip the IndexFlatIP row")
    args = parser.parse_args()

    if args.features:
        train_f, train_y, test_f, test_y = load_features(args.features)
        num_classes = int(max(train_y.max(), test_y.max())) + 1
    else:
        train_f, train_y, test_f, test_y = clustered_data(
            args.num_train, args.num_test, args.dim, args.classes, args.noise, args.seed
        )
        num_classes = args.classes
    k, sigma = args.k, args.temperature

    def ours(backend: str) -> Callable[[], dict[str, float]]:
        def run() -> dict[str, float]:
            index = KnnIndex(dim=train_f.shape[1], kind="flat", backend=backend)
            index.add(train_f)
            return knn_evaluate(index, train_y, test_f, test_y, num_classes, k, sigma)

        return run

    methods: dict[str, Callable[[], object]] = {
        "reference (torch, chunks of 100)": lambda: reference_knn(
            train_f, train_y, test_f, test_y, num_classes, k, sigma
        )[0],
        "knn_evaluate (auto)": ours("auto"),
    }
    if not args.no_faiss_native:
        methods["knn_evaluate (faiss IndexFlatIP)"] = ours("faiss")

    faiss_threads = "n/a"
    try:
        import faiss

        faiss_threads = str(faiss.omp_get_max_threads())
    except ImportError:
        pass
    auto_backend = KnnIndex(dim=train_f.shape[1]).backend
    print(
        f"bank {train_f.shape[0]} x {train_f.shape[1]}, queries {test_f.shape[0]}, k={k}, "
        f"C={num_classes}, repeats={args.repeats}; torch threads {torch.get_num_threads()}, "
        f"faiss omp threads {faiss_threads}; auto backend: {auto_backend}"
    )

    for fn in methods.values():  # warm-up: thread pools, MKL/FAISS initialisation, page cache
        fn()
    walls: dict[str, list[float]] = {name: [] for name in methods}
    cpus: dict[str, list[float]] = {name: [] for name in methods}
    results: dict[str, object] = {}
    for _ in range(args.repeats):  # interleaved, so background load hits every method alike
        for name, fn in methods.items():
            wall, cpu, out = timed(fn)
            walls[name].append(wall)
            cpus[name].append(cpu)
            results[name] = out

    ref_name = next(iter(methods))
    ref_median = statistics.median(walls[ref_name])
    print(f"{'method':<34} {'median s':>9} {'min s':>7} {'cpu/wall':>8} {'ratio':>6}  top1    top5")
    for name in methods:
        med = statistics.median(walls[name])
        util = sum(cpus[name]) / sum(walls[name])
        acc = results[name]
        print(
            f"{name:<34} {med:9.3f} {min(walls[name]):7.3f} {util:8.2f} {med / ref_median:6.2f}"
            f"  {acc['top1']:.4f}  {acc['top5']:.4f}"
        )

    _, ref_pred = reference_knn(train_f, train_y, test_f, test_y, num_classes, k, sigma)
    scores = knn_predict(train_f, train_y, test_f, num_classes, k, sigma)
    our_pred = scores.sort(dim=1, descending=True, stable=True).indices[:, 0]
    differing = int((our_pred != ref_pred).sum())
    same_numbers = all(results[name] == results[ref_name] for name in methods)
    print(
        f"top-1 predictions identical to the reference: {differing == 0} "
        f"({differing} of {len(ref_pred)} differ); identical accuracies: {same_numbers}"
    )


if __name__ == "__main__":
    main()
