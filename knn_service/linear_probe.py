"""A linear classifier on frozen features, the paper's linear evaluation (Wu et al. Table 1).

Plain torch, so it runs wherever the features are (a GPU when present). Two losses:

- ``"logistic"``: multinomial logistic regression (softmax cross-entropy);
- ``"svm"``: a linear SVM, one-vs-rest with the squared hinge
  ``Σ_c max(0, 1 - t_c s_c)²``, ``t_c = +1`` for the true class and ``-1`` otherwise
  (scikit-learn's ``LinearSVC`` default loss; smooth, so L-BFGS applies).

Features are standardized with the mean and std of the rows the classifier is fitted on.
The objective is ``mean_i loss(x_i) + l2/2 · ||W||²`` (the bias is not penalized), minimized
full batch by L-BFGS with a strong Wolfe line search; the loss is summed in row chunks, so
memory beyond the features is one chunk of scores. In scikit-learn's terms
``C = 1 / (l2 · N)``.

:func:`select_and_fit` chooses ``l2`` from :data:`L2_GRID` on a seeded, class-stratified
held-out part of the training rows (:func:`stratified_holdout`), never on validation data,
then refits on all the training rows with the chosen strength.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "L2_GRID",
    "LOSSES",
    "LinearClassifier",
    "ProbeResult",
    "fit_linear",
    "select_and_fit",
    "stratified_holdout",
    "topk_accuracy",
]

logger = logging.getLogger(__name__)

#: The L2 strengths tried, 1e-6 to 1e-1, one per decade.
L2_GRID: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
#: Accepted values of ``loss``.
LOSSES: tuple[str, ...] = ("logistic", "svm")
#: Rows per chunk when summing the loss (bounds the memory of the scores).
CHUNK_ROWS = 65536
#: L-BFGS iterations per fit.
MAX_ITER = 200


@dataclass(frozen=True)
class LinearClassifier:
    """Class scores ``((x - mean) / std) @ weight.T + bias``.

    Attributes:
        weight: ``[C, D]``, in standardized feature space.
        bias: ``[C]``.
        mean: ``[D]`` feature means of the rows it was fitted on.
        std: ``[D]`` their standard deviations (at least 1e-6).
        loss: ``"logistic"`` or ``"svm"``.
        l2: the regularization strength it was fitted with.
        evaluations: the objective evaluations L-BFGS used.
    """

    weight: Tensor
    bias: Tensor
    mean: Tensor
    std: Tensor
    loss: str
    l2: float
    evaluations: int

    @torch.no_grad()
    def scores(self, x: Tensor) -> Tensor:
        """``x``: ``[N, D]`` -> class scores ``[N, C]`` (on ``x``'s device, float32)."""
        z = (x.float() - self.mean) / self.std
        return z @ self.weight.T + self.bias


@dataclass(frozen=True)
class ProbeResult:
    """What :func:`select_and_fit` chose and fitted.

    Attributes:
        classifier: refitted on all the training rows with ``l2``.
        l2: the chosen strength.
        holdout_top1: ``{l2: top-1 on the held-out rows}`` for every strength tried.
        num_fit: rows the grid's classifiers were fitted on.
        num_holdout: the held-out rows they were scored on.
    """

    classifier: LinearClassifier
    l2: float
    holdout_top1: dict[float, float]
    num_fit: int
    num_holdout: int


def _check_inputs(x: Tensor, y: Tensor, num_classes: int) -> None:
    if x.dim() != 2 or y.dim() != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"expected x [N, D] and y [N], got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] == 0:
        raise ValueError("no rows to fit")
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got [{int(y.min())}, {int(y.max())}]"
        )


def _loss_sum(scores: Tensor, y: Tensor, loss: str) -> Tensor:
    """Summed loss of ``scores [n, C]`` against labels ``y [n]``."""
    if loss == "logistic":
        return F.cross_entropy(scores, y, reduction="sum")
    signs = torch.full_like(scores, -1.0).scatter_(1, y[:, None], 1.0)  # t: [n, C]
    return F.relu(1.0 - signs * scores).square().sum()


def fit_linear(
    x: Tensor,
    y: Tensor,
    num_classes: int,
    l2: float,
    loss: str = "logistic",
    *,
    max_iter: int = MAX_ITER,
    init: LinearClassifier | None = None,
) -> LinearClassifier:
    """Fit a linear classifier to ``x [N, D]`` and labels ``y [N]`` (int64 in ``[0, C)``).

    Minimizes ``mean loss + l2/2 ||W||²`` by full-batch L-BFGS (see the module docstring) on
    ``x``'s device; ``init`` warm-starts from another classifier's weights.

    Raises:
        ValueError: bad shapes, labels out of range, unknown ``loss`` or a negative ``l2``.
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
    if not l2 >= 0:
        raise ValueError(f"l2 must be >= 0, got {l2}")
    _check_inputs(x, y, num_classes)
    x = x.float()
    n, d = x.shape
    mean = x.mean(0)
    std = x.std(0, unbiased=False).clamp_min(1e-6)
    z = (x - mean) / std  # [N, D]
    y = y.to(x.device).long()
    if init is None:
        weight = torch.zeros(num_classes, d, device=x.device)
        bias = torch.zeros(num_classes, device=x.device)
    else:
        weight, bias = init.weight.detach().clone(), init.bias.detach().clone()
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-6,
        tolerance_change=1e-10,
        line_search_fn="strong_wolfe",
    )
    calls = 0

    def objective() -> Tensor:
        nonlocal calls
        calls += 1
        optimizer.zero_grad()
        total = torch.zeros((), device=x.device)
        for start in range(0, n, CHUNK_ROWS):
            rows = slice(start, start + CHUNK_ROWS)
            part = _loss_sum(z[rows] @ weight.T + bias, y[rows], loss) / n
            part.backward()
            total += part.detach()
        penalty = 0.5 * l2 * weight.square().sum()
        penalty.backward()
        return total + penalty.detach()

    optimizer.step(objective)
    return LinearClassifier(
        weight=weight.detach(),
        bias=bias.detach(),
        mean=mean,
        std=std,
        loss=loss,
        l2=float(l2),
        evaluations=calls,
    )


def stratified_holdout(labels: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Split row positions ``[0, N)`` into ``(fit [N - H], holdout [H])``, both sorted.

    Each class gives ``round(fraction · n_c)`` of its ``n_c`` rows, drawn with a generator
    seeded by ``seed`` (the same labels and seed give the same split), but always keeps at
    least one row for fitting; so the held-out part has the class proportions of ``labels``.

    Raises:
        ValueError: ``fraction`` not in ``(0, 1)``, or nothing would be held out.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"the held-out fraction must lie in (0, 1), got {fraction}")
    labels = labels.cpu()
    generator = torch.Generator().manual_seed(seed)
    held = []
    for label in torch.unique(labels):
        rows = torch.nonzero(labels == label).flatten()
        take = min(round(fraction * len(rows)), len(rows) - 1)
        held.append(rows[torch.randperm(len(rows), generator=generator)[:take]])
    holdout = torch.cat(held).sort().values
    if len(holdout) == 0:
        raise ValueError(
            f"holding out {fraction} of {len(labels)} rows leaves no row out; "
            "raise the fraction or use more data"
        )
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[holdout] = False
    return torch.nonzero(keep).flatten(), holdout


@torch.no_grad()
def topk_accuracy(scores: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, float]:
    """``{k: fraction of rows whose label is among the top-k scores}``; ``scores [N, C]``,
    ``labels [N]``; ``k`` is capped at ``C`` (top-5 of 3 classes is 1.0)."""
    if len(labels) == 0:
        raise ValueError("no rows to score")
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices  # [N, k]
    hits = top == labels.to(scores.device)[:, None]
    return {k: float(hits[:, :k].any(dim=1).double().mean()) for k in ks}


def select_and_fit(
    x: Tensor,
    y: Tensor,
    num_classes: int,
    loss: str = "logistic",
    *,
    grid: tuple[float, ...] = L2_GRID,
    holdout_fraction: float = 0.1,
    seed: int = 0,
    max_iter: int = MAX_ITER,
) -> ProbeResult:
    """Choose ``l2`` on a held-out part of ``(x [N, D], y [N])`` and refit on all of it.

    The grid is fitted from the strongest strength down, each fit warm-started from the
    previous; the strength with the best held-out top-1 wins (ties: the stronger one).
    """
    _check_inputs(x, y, num_classes)
    if not grid:
        raise ValueError("the l2 grid is empty")
    fit_rows, held_rows = stratified_holdout(y, holdout_fraction, seed)  # on the CPU
    y = y.to(x.device)
    fit_rows, held_rows = fit_rows.to(x.device), held_rows.to(x.device)
    x_fit, y_fit = x[fit_rows], y[fit_rows]
    x_held, y_held = x[held_rows], y[held_rows]
    holdout_top1: dict[float, float] = {}
    previous = None
    for l2 in sorted(grid, reverse=True):
        previous = fit_linear(x_fit, y_fit, num_classes, l2, loss, max_iter=max_iter, init=previous)
        holdout_top1[l2] = topk_accuracy(previous.scores(x_held), y_held, (1,))[1]
        logger.info("l2 %g: held-out top-1 %.4f", l2, holdout_top1[l2])
    best = max(holdout_top1, key=lambda l2: (holdout_top1[l2], l2))
    classifier = fit_linear(x, y, num_classes, best, loss, max_iter=max_iter)
    return ProbeResult(
        classifier=classifier,
        l2=best,
        holdout_top1=dict(sorted(holdout_top1.items())),
        num_fit=len(fit_rows),
        num_holdout=len(held_rows),
    )
