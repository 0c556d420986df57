"""Smoke of every accelerator path that runs without Ray: part (a) of ``device_check.sh``.

Each check runs on ``--device`` and compares with the same computation on the CPU:

- ``bank-<objective>``: three :class:`~featurestore.MemoryBank` steps of the exact softmax,
  the sampled softmax and NCE on the device against the CPU (loss, gradient, rows, Z);
- ``shard-statistics``: one :class:`~featurestore.bank_shard.BankShard` (rows ``[lo, hi)``
  of a bank) computing a step's partial statistics on the device against the CPU;
- ``knn-torch``: the torch exact search (:class:`~featurestore.knn.index.KnnIndex`,
  ``backend="torch"``) on the device against the CPU index (FAISS when installed): the
  200-NN ids and similarities;
- ``train-steps``: ResNet-18 (CIFAR stem) training steps on the device in channels_last,
  bf16 autocast, fused SGD, with the in-process bank's exact softmax (float32): the loss
  stays finite and falls on a fixed batch; images/s is reported.

Writes ``OUT`` (JSON: one record per check with ``ok`` and its measurements) and logs one
line per check; exits 1 when any check fails. Needs neither Ray, webdataset nor FAISS.

    python benchmarks/device_smoke.py --device cuda --out OUTDIR/smoke.json
    python benchmarks/device_smoke.py --device cpu --small --out /tmp/smoke.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from featurestore import NCE, MemoryBank, SampledSoftmax, Softmax  # noqa: E402
from featurestore.bank_shard import BankShard, initial_rows  # noqa: E402
from featurestore.knn.index import KnnIndex  # noqa: E402
from trainer.model.encoders import EncoderConfig, build_encoder  # noqa: E402

logger = logging.getLogger("device_smoke")


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> float:
    """Max absolute difference of two tensors (moved to the CPU, float32); raises over tol."""
    diff = float((a.detach().float().cpu() - b.detach().float().cpu()).abs().max())
    if not diff <= tol:
        raise AssertionError(f"max abs difference {diff:.3g} > {tol:g}")
    return diff


def check_bank(device: torch.device, rows: int, batch: int, k: int) -> list[dict]:
    """Three bank steps per objective on ``device`` against the CPU."""
    out = []
    objectives = {
        "softmax": Softmax(temperature=0.07),
        "sampled-softmax": SampledSoftmax(num_negatives=k, temperature=0.07),
        "nce": NCE(num_negatives=k, temperature=0.07, z_momentum=0.99),
    }
    for name, objective in objectives.items():
        banks = [MemoryBank(rows, 128, momentum=0.5, seed=3, device=d) for d in ("cpu", device)]
        gen = torch.Generator().manual_seed(7)
        worst = 0.0
        for _ in range(3):
            feats = F.normalize(torch.randn(batch, 128, generator=gen), dim=1)
            ids = torch.randperm(rows, generator=gen)[:batch]
            ref = banks[0].step(feats, ids, objective)
            got = banks[1].step(feats.to(device), ids.to(device), objective)
            # float() first: a 0-d tensor here made ``worst`` a tensor that JSON cannot write
            ref_loss, got_loss = float(ref.loss), float(got.loss)
            worst = max(worst, abs(ref_loss - got_loss) / max(1.0, abs(ref_loss)))
            worst = max(worst, _close(ref.grad, got.grad, 1e-4))
        worst = max(worst, _close(banks[0].rows, banks[1].rows, 1e-4))
        if banks[0].z is not None:
            z_ref, z_got = float(banks[0].z), float(banks[1].z)
            worst = max(worst, abs(z_ref - z_got) / z_ref)
        if worst > 1e-4:
            raise AssertionError(f"{name}: relative loss / Z difference {worst:.3g} > 1e-4")
        out.append({"check": f"bank-{name}", "ok": True, "max_diff": float(worst)})
    return out


def check_shard_statistics(device: torch.device, rows: int, batch: int) -> dict:
    """Partial statistics of rows ``[rows/4, 3·rows/4)`` of a bank on ``device`` vs CPU."""
    lo, hi = rows // 4, 3 * rows // 4
    init = initial_rows(5, lo, hi - lo, 128, False)
    shards = [BankShard(init, lo, 0.5, d) for d in ("cpu", device)]
    gen = torch.Generator().manual_seed(11)
    feats = F.normalize(torch.randn(batch, 128, generator=gen), dim=1)
    ids = torch.randint(0, rows, (batch,), generator=gen)
    parts = [s.statistics(feats, ids, Softmax(0.07), None, None, rows) for s in shards]
    worst = 0.0
    for field in ("pos_index", "pos_rows", "max", "sumexp", "weighted"):
        a, b = getattr(parts[0], field), getattr(parts[1], field)
        scale = max(1.0, float(a.float().abs().max())) if a.numel() else 1.0
        worst = max(worst, _close(a, b, 1e-4 * scale) / scale if a.numel() else 0.0)
    return {"check": "shard-statistics", "ok": True, "max_rel_diff": worst}


def check_knn(device: torch.device, rows: int, queries: int, k: int = 200) -> dict:
    """200-NN by the torch search on ``device`` against the CPU index."""
    gen = torch.Generator().manual_seed(13)
    bank = F.normalize(torch.randn(rows, 128, generator=gen), dim=1)
    q = F.normalize(torch.randn(queries, 128, generator=gen), dim=1)
    ids = torch.arange(rows)
    try:
        ref = KnnIndex(dim=128, device="cpu", backend="faiss")
    except ValueError:  # FAISS is not installed: the CPU torch search is the reference
        ref = KnnIndex(dim=128, device="cpu", backend="torch")
    got = KnnIndex(dim=128, device=device, backend="torch")
    for index in (ref, got):
        index.add(bank, ids)
    t0 = time.perf_counter()
    sims_g, ids_g = got.search(q, k)
    seconds = time.perf_counter() - t0
    sims_r, ids_r = ref.search(q, k)
    diff = _close(sims_r, sims_g, 1e-4)
    same = float((torch.sort(ids_r, 1).values == torch.sort(ids_g, 1).values).float().mean())
    if same < 0.999:  # ties at the k-th similarity may be broken differently
        raise AssertionError(f"only {same:.4%} of the neighbour ids agree with the CPU index")
    return {
        "check": "knn-torch",
        "ok": True,
        "backend_cpu": ref.backend,
        "ids_agree": same,
        "max_sim_diff": diff,
        "queries_per_sec": queries / seconds,
    }


def check_train_steps(device: torch.device, rows: int, batch: int, steps: int) -> dict:
    """bf16 + channels_last + fused SGD ResNet-18 steps with the exact softmax bank.

    On the CPU the steps run in float32: a CPU without native bfloat16 emulates it so
    slowly that six steps once took over two minutes on a CI machine."""
    torch.manual_seed(0)
    amp = device.type == "cuda"
    config = EncoderConfig.for_preset("resnet18", 128, "cifar")
    model = build_encoder(**config.to_dict()).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9, fused=True)
    bank = MemoryBank(rows, 128, momentum=0.5, seed=0, device=device)
    x = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    ids = torch.arange(batch, device=device)
    losses, t0 = [], 0.0
    for step in range(steps):
        if step == 2:  # the first steps pay for cuDNN's algorithm search
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            feats = model(x)
        if amp and feats.dtype != torch.bfloat16:
            raise AssertionError(f"autocast gave {feats.dtype} features, not bfloat16")
        out = bank.step(feats.detach().float(), ids, Softmax(0.07))
        optimizer.zero_grad(set_to_none=True)
        feats.backward(out.grad.to(feats.dtype))
        optimizer.step()
        losses.append(float(out.loss))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    if not all(math.isfinite(v) for v in losses):
        raise AssertionError(f"non-finite loss: {losses}")
    if not min(losses[-3:]) < losses[0]:
        raise AssertionError(f"the loss did not fall on a fixed batch: {losses}")
    return {
        "check": "train-steps",
        "ok": True,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "images_per_sec": batch * (steps - 2) / seconds,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--small", action="store_true", help="smaller sizes (a CPU smoke)")
    p.add_argument("--out", type=Path, required=True, help="JSON file written")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible (use --device cpu)")
    rows, batch, k, queries, steps = (
        (4096, 64, 256, 256, 6) if args.small else (50_000, 256, 4096, 10_000, 30)
    )
    records: list[dict] = []
    checks = [
        lambda: check_bank(device, rows, batch, k),
        lambda: [check_shard_statistics(device, rows, batch)],
        lambda: [check_knn(device, rows, queries)],
        lambda: [check_train_steps(device, rows, batch, steps)],
    ]
    for name, check in zip(("bank", "shard-statistics", "knn-torch", "train-steps"), checks):
        try:
            records.extend(check())
        except Exception as exc:  # every failure is a result to report
            records.append({"check": name, "ok": False, "error": f"{type(exc).__name__}: {exc}"})
    for record in records:
        logger.info("%s %s", "ok  " if record["ok"] else "FAIL", json.dumps(record))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    summary = {"device": str(device), "torch": torch.__version__, "checks": records}
    if device.type == "cuda":
        summary["device_name"] = torch.cuda.get_device_name(device)
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    return 0 if all(r["ok"] for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
