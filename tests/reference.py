"""Plain autograd reference implementations of the objectives (the lemniscate way).

Each function gathers the scored rows, computes the loss with ordinary torch ops and lets
autograd produce ``∂loss/∂f``. Tests compare the store's partial-statistics path to these.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from featurestore import NCE, SampledSoftmax, Softmax


def _prox(x: Tensor, pos: Tensor, prox_lambda: float) -> Tensor:
    return prox_lambda * ((x - pos) ** 2).sum(dim=1).mean()


def nce_reference(
    rows: Tensor,
    feats: Tensor,
    ids: Tensor,
    noise: Tensor,
    temperature: float,
    z: float | None,
    eps: float = 1e-7,
    prox_lambda: float = 0.0,
) -> tuple[Tensor, Tensor, float]:
    """Reference NCE: returns ``(loss, grad [B, d], z)``; ``noise`` is ``[B, K]``."""
    n, k = rows.shape[0], noise.shape[1]
    x = feats.detach().clone().double().requires_grad_(True)
    idx = torch.cat([ids.view(-1, 1), noise], dim=1)  # [B, K+1]
    w = rows.double()[idx]  # [B, K+1, d]
    out = torch.exp(torch.bmm(w, x.unsqueeze(2)).squeeze(2) / temperature)
    if z is None:
        z = float(out.mean().detach()) * n
    out = out / z
    pn = 1.0 / n
    ln_pmt = torch.log(out[:, 0] / (out[:, 0] + k * pn + eps))
    ln_pon = torch.log((k * pn) / (out[:, 1:] + k * pn + eps))
    loss = -(ln_pmt.sum() + ln_pon.sum()) / x.shape[0]
    loss = loss + _prox(x, rows.double()[ids], prox_lambda)
    loss.backward()
    return loss.detach().float(), x.grad.float(), z


def softmax_reference(
    rows: Tensor, feats: Tensor, ids: Tensor, temperature: float, prox_lambda: float = 0.0
) -> tuple[Tensor, Tensor]:
    """Reference exact softmax over all rows: ``(loss, grad [B, d])``."""
    x = feats.detach().clone().double().requires_grad_(True)
    logits = x @ rows.double().T / temperature
    loss = F.cross_entropy(logits, ids) + _prox(x, rows.double()[ids], prox_lambda)
    loss.backward()
    return loss.detach().float(), x.grad.float()


def sampled_softmax_reference(
    rows: Tensor,
    feats: Tensor,
    ids: Tensor,
    noise: Tensor,
    temperature: float,
    prox_lambda: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Reference sampled softmax, logits ``[s_i, s_n1 … s_nK]``, target 0."""
    x = feats.detach().clone().double().requires_grad_(True)
    idx = torch.cat([ids.view(-1, 1), noise], dim=1)
    w = rows.double()[idx]
    logits = torch.bmm(w, x.unsqueeze(2)).squeeze(2) / temperature
    target = torch.zeros(x.shape[0], dtype=torch.long)
    loss = F.cross_entropy(logits, target) + _prox(x, rows.double()[ids], prox_lambda)
    loss.backward()
    return loss.detach().float(), x.grad.float()


def momentum_update_reference(rows: Tensor, ids: Tensor, feats: Tensor, m: float) -> Tensor:
    """Rows after ``v_i ← normalize(m·v_i + (1-m)·f)`` for distinct ``ids``."""
    out = rows.clone().float()
    out[ids] = F.normalize(m * out[ids] + (1 - m) * feats.float(), dim=1)
    return out


def unit(n: int, d: int, seed: int) -> Tensor:
    """``n`` random unit vectors of dimension ``d``."""
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=1)


def bad_step_cases(feats: Tensor, ids: Tensor, noise: Tensor, num_rows: int, k: int):
    """``(message, step kwargs)`` for every bad ``step`` input, shared by the bank and store
    tests so both are held to the same errors. ``noise`` is ``[B, K]`` in range."""
    f, n = feats, num_rows
    nce = NCE(num_negatives=k)
    return [
        ("out of range", dict(feats=f, ids=ids.clone().fill_(n), objective=nce)),
        ("out of range", dict(feats=f, ids=ids - 1000, objective=nce)),
        ("integer dtype", dict(feats=f, ids=ids.float(), objective=nce)),
        ("1-D", dict(feats=f, ids=ids.view(-1, 1), objective=nce)),
        ("entries but the batch", dict(feats=f, ids=ids[:-1], objective=nce)),
        ("shape", dict(feats=f[:, :-1], ids=ids, objective=nce)),
        ("shape", dict(feats=f[0], ids=ids[:1], objective=nce)),
        ("floating dtype", dict(feats=f.long(), ids=ids, objective=nce)),
        ("non-finite", dict(feats=f.clone().fill_(math.nan), ids=ids, objective=nce)),
        ("non-finite", dict(feats=f.clone().fill_(math.inf), ids=ids, objective=nce)),
        ("larger than", dict(feats=f, ids=ids, objective=NCE(num_negatives=n + 1))),
        ("larger than", dict(feats=f, ids=ids, objective=SampledSoftmax(num_negatives=n + 1))),
        ("noise_ids must have", dict(feats=f, ids=ids, objective=nce, noise_ids=noise[:, :3])),
        ("noise_ids out of range", dict(feats=f, ids=ids, objective=nce, noise_ids=noise + n)),
        ("scores all rows", dict(feats=f, ids=ids, objective=Softmax(), noise_ids=noise)),
        ("empty batch", dict(feats=f[:0], ids=ids[:0], objective=nce)),
        ("objective must be", dict(feats=f, ids=ids, objective="nce")),
    ]
