"""Benchmark: the linear evaluation's fit (``knn_service.linear``) vs scikit-learn, CIFAR size.

Issue 11 asks for a linear evaluation that runs on a CPU "for CIFAR-10 (50k x 512 features)
in minutes". This times the whole protocol of ``python -m knn_service.linear`` after the
features are extracted: :func:`knn_service.linear_probe.select_and_fit` (the six strengths of
``L2_GRID`` fitted on nine tenths of the rows and scored on the held-out tenth, then a refit
on all rows) and scoring the validation rows. Baseline, the same protocol with scikit-learn
(``LogisticRegression(solver="lbfgs")`` or ``LinearSVC``, ``C = 1 / (l2 · N)``, the same
split and standardisation). Features are synthetic (class means plus noise, ReLU'd like
pooled features); their accuracy is printed so that both sides are seen to fit the same
problem. On them the strongest strength (0.1) wins; features of a trained encoder choose
weaker ones (1e-4 on CIFAR-10), whose fits take more L-BFGS steps.

    python benchmarks/bench_linear.py                           # 50k x 512, 10k val, both losses
    python benchmarks/bench_linear.py --num-train 5000 --num-val 1000 --repeats 1  # smoke run
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from knn_service.linear_probe import L2_GRID, select_and_fit, stratified_holdout, topk_accuracy


def synthetic_features(
    n: int, dim: int, classes: int, noise: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x [n, dim] >= 0, y [n])``: class means ~ N(0, 1), plus N(0, noise²), ReLU'd."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, dim, generator=torch.Generator().manual_seed(1234))
    y = torch.randint(0, classes, (n,), generator=g)
    return (means[y] + noise * torch.randn(n, dim, generator=g)).relu(), y


def sklearn_protocol(x, y, x_val, y_val, loss: str, seed: int) -> tuple[float, float]:
    """The same selection and refit with scikit-learn: ``(l2 chosen, validation top-1)``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import LinearSVC

    def model(l2: float, n: int):
        c = 1.0 / (l2 * n)
        if loss == "logistic":
            return LogisticRegression(C=c, max_iter=200, tol=1e-4)
        return LinearSVC(C=c, dual=False, max_iter=2000, tol=1e-4)  # primal: N > D

    def standardise(fit, *others):
        mean, std = fit.mean(0), fit.std(0, unbiased=False).clamp_min(1e-6)
        return [((t - mean) / std).numpy() for t in (fit, *others)]

    fit_rows, held_rows = stratified_holdout(y, 0.1, seed)
    z_fit, z_held = standardise(x[fit_rows], x[held_rows])
    scores = {}
    for l2 in sorted(L2_GRID, reverse=True):
        m = model(l2, len(fit_rows)).fit(z_fit, y[fit_rows].numpy())
        scores[l2] = float((m.predict(z_held) == y[held_rows].numpy()).mean())
    best = max(scores, key=lambda l2: (scores[l2], l2))
    z_all, z_val = standardise(x, x_val)
    m = model(best, len(y)).fit(z_all, y.numpy())
    return best, float((m.predict(z_val) == y_val.numpy()).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-train", type=int, default=50_000)
    parser.add_argument("--num-val", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--noise", type=float, default=6.0, help="per-dim noise std")
    parser.add_argument("--losses", nargs="+", default=["logistic", "svm"])
    parser.add_argument(
        "--baseline-losses",
        nargs="*",
        default=["logistic"],
        help="losses timed with scikit-learn too (LinearSVC at weak "
        "regularisation takes about 70 s for 5k rows, so svm is opt-in)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    x, y = synthetic_features(args.num_train, args.dim, args.classes, args.noise, args.seed)
    x_val, y_val = synthetic_features(args.num_val, args.dim, args.classes, args.noise, 99)
    print(f"features: {args.num_train} x {args.dim} train, {args.num_val} val, "
          f"{args.classes} classes, {torch.get_num_threads()} threads")  # fmt: skip
    print(
        "| loss | ours: median s | ours: l2, val top-1 | sklearn: median s "
        "| sklearn: l2, val top-1 | ours / sklearn |"
    )
    print("|---|---|---|---|---|---|")
    for loss in args.losses:
        ours_s, theirs_s = [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            probe = select_and_fit(x, y, args.classes, loss, seed=args.seed)
            ours_top1 = topk_accuracy(probe.classifier.scores(x_val), y_val, (1,))[1]
            ours_s.append(time.perf_counter() - t)
            if loss in args.baseline_losses:
                t = time.perf_counter()
                sk_l2, sk_top1 = sklearn_protocol(x, y, x_val, y_val, loss, args.seed)
                theirs_s.append(time.perf_counter() - t)
        ours = statistics.median(ours_s)
        row = f"| {loss} | {ours:.1f} | {probe.l2:g}, {100 * ours_top1:.2f} % |"
        if theirs_s:
            theirs = statistics.median(theirs_s)
            row += f" {theirs:.1f} | {sk_l2:g}, {100 * sk_top1:.2f} % | {ours / theirs:.2f} |"
        else:
            row += " – | – | – |"
        print(row)


if __name__ == "__main__":
    main()
