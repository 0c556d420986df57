"""Learning fidelity: the project's trainer against a plain reference loop, same recipe,
same data, same seed, curves side by side (issue target: the trainer ends within 1.5
points of the plain loop's recomputed kNN top-1).

The trainer side is ``python -m trainer.run`` as a user runs it (Ray Train and the
feature store by default; ``--launcher local`` for the in-process twin); the plain side is
``benchmarks/plain_loop.py``: torchvision ``ImageFolder`` + ``DataLoader`` with PIL
augmentation, the bank as one tensor, autograd through ``F.cross_entropy`` (or NCE written
out), the momentum update. The recipe (arch, epochs, batch, lr, schedule, warm-up, τ, bank
momentum, objective, K, seed) is the trainer's resolved config, handed to both. The plain
loop reads the ImageFolder the shards were made from (``dataset.json``'s ``source``), so
both see the same images with the same ids.

    python benchmarks/bench_learning.py --data .data/shards/train --val-data .data/shards/test \\
        --config trainer/configs/cifar10-cpu.yaml
    python benchmarks/bench_learning.py --data … --val-data … --arch small --nce-k 0 \\
        --epochs 12 --lr 0.03 --schedule step      # the issue's reference measurement
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from plain_loop import PlainRecipe, run  # noqa: E402

from trainer.flags import parse_config  # noqa: E402
from trainer.plan import make_plan  # noqa: E402

TOLERANCE = 0.015


def _image_folder(shards: str) -> str:
    meta = json.loads((Path(shards) / "dataset.json").read_text())
    if meta.get("source_type") != "imagefolder":
        raise SystemExit(f"{shards}: made from {meta.get('source_type')}, not an ImageFolder")
    return meta["source"]


def recipe_from_trainer(argv: list[str]) -> PlainRecipe:
    """The plain loop's recipe: the trainer's config resolved against the data."""
    cfg = parse_config(argv)
    plan = make_plan(cfg)
    objective = plan.objective
    kind = {"softmax": "softmax", "nce": "nce", "sampled_softmax": "sampled-softmax"}
    if objective["kind"] not in kind:  # the plain loop is the bank's reference loop
        raise SystemExit(f"--objective {objective['kind']}: the plain loop has a bank objective")
    return PlainRecipe(
        arch=plan.arch,
        low_dim=cfg.low_dim,
        epochs=plan.epochs,
        batch_size=cfg.resolved_batch_size,
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        schedule=cfg.schedule,
        warmup_epochs=cfg.warmup_epochs,
        temperature=cfg.nce_t,
        bank_momentum=cfg.nce_m,
        objective=kind[objective["kind"]],
        nce_k=objective.get("num_negatives", cfg.resolved_nce_k),
        z_momentum=objective.get("z_momentum"),
        seed=cfg.seed,
        preset=plan.preset,
        knn_k=cfg.knn_k,
    )


def run_trainer(argv: list[str], out: Path) -> tuple[list[dict], float]:
    """``python -m trainer.run ARGV --output OUT``: its metrics records and wall seconds."""
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "trainer.run", *argv, "--output", str(out), "--no-progress"],
        check=True,
        cwd=REPO,
        env=env,
    )
    wall = time.perf_counter() - start
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return records, wall


def _curve(records: list[dict]) -> tuple[dict[int, dict], float]:
    per_epoch = {r["epoch"]: r for r in records if r.get("features") == "bank"}
    final = [r for r in records if r.get("features") == "recomputed" and r["epoch"] > 0]
    return per_epoch, final[-1]["knn_top1"]


def _fmt(value, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "-"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="keep both runs here (default: a temp dir)")
    parser.add_argument("--skip-plain", action="store_true", help="the trainer side only")
    args, trainer_argv = parser.parse_known_args()
    cfg_argv = list(trainer_argv)
    data = cfg_argv[cfg_argv.index("--data") + 1]
    val = cfg_argv[cfg_argv.index("--val-data") + 1]
    recipe = recipe_from_trainer(cfg_argv)
    print(f"recipe: {json.dumps(recipe.__dict__)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="npid-bench-learning-") as tmp:
        root = args.out or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        trainer_records, trainer_wall = run_trainer(cfg_argv, root / "trainer")
        plain_records: list[dict] = []
        plain_wall = 0.0
        if not args.skip_plain:
            start = time.perf_counter()
            plain_records = run(
                _image_folder(data), _image_folder(val), recipe, root / "plain.jsonl"
            )
            plain_wall = time.perf_counter() - start
    t_curve, t_final = _curve(trainer_records)
    p_curve, p_final = _curve(plain_records) if plain_records else ({}, float("nan"))
    print(f"\n{'epoch':>5} {'trainer loss':>13} {'plain loss':>11} "
          f"{'trainer bank kNN':>17} {'plain bank kNN':>15}")  # fmt: skip
    for epoch in sorted(set(t_curve) | set(p_curve)):
        t, p = t_curve.get(epoch, {}), p_curve.get(epoch, {})
        print(
            f"{epoch:>5} {_fmt(t.get('loss'), '13.3f')} {_fmt(p.get('loss'), '11.3f')} "
            f"{_fmt(t.get('knn_top1'), '17.4f')} {_fmt(p.get('knn_top1'), '15.4f')}"
        )
    t0 = trainer_records[0]["knn_top1"] if trainer_records[0]["epoch"] == 0 else float("nan")
    p0 = plain_records[0]["knn_top1"] if plain_records else float("nan")
    print(f"\nepoch 0 (recomputed): trainer {t0:.4f}, plain {p0:.4f}")
    print(f"final recomputed kNN top-1: trainer {t_final:.4f} ({trainer_wall / 60:.1f} min), "
          f"plain {p_final:.4f} ({plain_wall / 60:.1f} min)")  # fmt: skip
    if plain_records:
        gap = t_final - p_final
        verdict = "within" if gap >= -TOLERANCE else "NOT within"
        print(f"trainer - plain = {100 * gap:+.2f} points: {verdict} 1.5 points of the plain loop")
        return 0 if gap >= -TOLERANCE else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
