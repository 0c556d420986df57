"""``python -m trainer.study KIND``: one of the paper's studies as a grid of Ray Tune trials.

    python -m trainer.study {embedding-size,data-fraction,nce-k,objective}
        [--data digits] [--val-data digits] [--values V ...] [--output runs/study-KIND]
        [--epochs E] [--workers-per-trial 1] [--seed 0] [--linear] [-- more trainer.run flags]

Each trial is a training run of ``python -m trainer.run`` (the trainer's own command and
code: Ray Train, the feature store, its kNN evaluation) on the study's Ray cluster, with
one setting changed (Wu et al. 2018):

- ``embedding-size``: ``--low-dim`` (Table 4: 32, 64, 128, 256);
- ``data-fraction``: a class-balanced, seeded fraction of the training ids, written as
  shards of its own (Table 5: accuracy grows with more unlabelled data);
- ``nce-k``: ``--objective nce --nce-k`` (Table 1: m = 1, 10, 512, 4096; values not below
  the training-set size are left out, with a log line);
- ``objective``: ``--objective`` (Table 1: parametric against non-parametric softmax, NCE).

Trials run as Ray Tune trials, as many at once as the cluster has CPUs for their training
workers (on a laptop they queue); each reports the run's final kNN top-1/top-5 (train
features recomputed, as the trainer's last metrics line) and, with ``--linear``, the
top-1/top-5 of a linear SVM on its frozen embedding (``python -m knn_service.linear``).
The study writes ``OUTPUT/study.json`` (every trial: its value, accuracy, epochs, seconds and run
directory), ``OUTPUT/study.md`` (a Markdown table) and ``OUTPUT/study.png`` (top-1 per
value). Ray: ``RAY_ADDRESS`` joins a cluster; otherwise a local instance on 127.0.0.1.
Bad input: one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from featurestore.argtypes import DefaultsHelpFormatter, OneLineParser
from trainer.config import DEFAULT_NCE_K, TrainConfig

logger = logging.getLogger("trainer.study")

PROG = "python -m trainer.study"
#: CPU a trial itself reserves (it only waits for its trainer.run).
TRIAL_CPU = 0.01


@dataclass(frozen=True)
class Study:
    """One study: the values it sweeps by default, how it parses one, and the paper's table."""

    name: str
    defaults: tuple
    parse: type
    what: str


STUDIES = {
    "embedding-size": Study("embedding-size", (32, 64, 128, 256), int, "--low-dim (Table 4)"),
    "data-fraction": Study("data-fraction", (0.25, 0.5, 1.0), float, "training ids (Table 5)"),
    "nce-k": Study("nce-k", (1, 10, 512, 4096), int, "--objective nce --nce-k (Table 1)"),
    "objective": Study("objective", ("parametric", "softmax", "nce"), str, "--objective (Table 1)"),
}

#: The trainer's default noise count (``--nce-k`` not given), the paper's m = 4096.
NCE_K = DEFAULT_NCE_K


class StudyError(ValueError):
    """A bad input; the message names it."""


def parser() -> argparse.ArgumentParser:
    """The command-line parser (``--help`` imports neither torch nor Ray)."""
    p = OneLineParser(
        prog=PROG,
        description="Run one of the paper's studies as Ray Tune trials of trainer.run.",
        epilog="Flags after `--` go to every trial's trainer.run (e.g. -- --arch resnet18).",
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument("study", choices=sorted(STUDIES), help="what to vary")
    p.add_argument("--data", default="digits", help="training shards (or the built-in name)")
    p.add_argument("--val-data", default="digits", help="labelled validation shards")
    p.add_argument("--values", nargs="+", help="the grid (default: the paper's, see above)")
    p.add_argument("--output", help="study directory (default: runs/study-STUDY)")
    p.add_argument(
        "--epochs",
        type=int,
        help="epochs per trial (default: the trainer's for --data: 40 for the built-in, else 200)",
    )
    p.add_argument("--workers-per-trial", type=int, default=1, help="Ray Train workers/trial")
    p.add_argument("--seed", type=int, default=0, help="seed of every trial (and the subsets)")
    p.add_argument(
        "--linear", action="store_true",
        help="also a linear SVM on each trial's frozen embedding (knn_service.linear)",
    )  # fmt: skip
    return p


def grid(study: Study, values: list[str] | None, num_train: int) -> list:
    """The values to run: parsed, checked, and for ``nce-k`` below ``num_train``.

    Raises:
        StudyError: a value that does not parse or is out of range.
    """
    chosen = []
    for text in values if values is not None else study.defaults:
        try:
            value = study.parse(text)
        except ValueError:
            kind = "an integer" if study.parse is int else "a number"
            raise StudyError(f"--values: {text!r} is not {kind}") from None
        if study.name == "data-fraction" and not 0 < value <= 1:
            raise StudyError(f"--values: a data fraction must be in (0, 1], got {value}")
        if study.name in ("embedding-size", "nce-k") and value < 1:
            raise StudyError(f"--values: {study.name} must be >= 1, got {value}")
        if study.name == "objective" and value not in ("parametric", "softmax", "nce",
                                                       "sampled-softmax"):  # fmt: skip
            raise StudyError(f"--values: unknown objective {value!r}")
        if study.name == "nce-k" and value >= num_train:
            logger.info("nce-k %d left out: not below the %d training instances", value, num_train)
            continue
        chosen.append(value)
    if not chosen:
        raise StudyError("--values: nothing left to run")
    return chosen


def trial_flags(study: Study, value: Any, data: str, num_train: int | None = None) -> list[str]:
    """The ``trainer.run`` flags of one trial (``data``: its training shards of ``num_train``
    images). The objective study's NCE trial samples ``min(4096, num_train - 1)`` noise
    rows: with the default K on fewer images the trainer would use the exact softmax."""
    flags = ["--data", data]
    if study.name == "embedding-size":
        flags += ["--low-dim", str(value)]
    elif study.name == "nce-k":
        flags += ["--objective", "nce", "--nce-k", str(value)]
    elif study.name == "objective":
        flags += ["--objective", str(value)]
        if value == "nce" and num_train is not None and num_train <= NCE_K:
            flags += ["--nce-k", str(num_train - 1)]
    return flags


def subset_data(train: str, fraction: float, seed: int, root: Path) -> str:
    """Shards of a seeded, class-balanced ``fraction`` of ``train`` under ``root``."""
    if fraction == 1:
        return train
    from trainer.data.subset import subset_source
    from trainer.shards.make import make_shards

    out = root / f"fraction-{fraction:g}-seed-{seed}"
    if not (out / "dataset.json").is_file():
        make_shards(
            subset_source(train, fraction, seed),
            out,
            overwrite=True,
            order="sorted",
            progress=False,
        )  # ids in the sampled order
    return str(out)


def run_trial(config: dict[str, Any]) -> None:
    """A Ray Tune trial (``config["trial"]``: value, flags, output, env, cwd): one
    ``trainer.run`` on the study's cluster; reports its final kNN top-1/top-5
    (``tune.report``). Raises when the run fails (Tune records it)."""
    from ray import tune

    from trainer.metrics import read_jsonl

    config = config["trial"]
    output = Path(config["output"])
    output.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    cwd = _cwd(config)
    cmd = [sys.executable, "-m", "trainer.run", *config["flags"], "--output", str(output),
           "--no-progress"]  # fmt: skip
    with (output / "trial.log").open("w") as log:
        code = subprocess.run(
            cmd, env=config["env"], stdout=log, stderr=subprocess.STDOUT, cwd=cwd
        ).returncode
    if code != 0:
        tail = (output / "trial.log").read_text().strip().splitlines()[-1:]
        raise RuntimeError(f"trainer.run exited {code}: {' '.join(tail)}")
    final = read_jsonl(output / "metrics.jsonl")[-1]
    found = {
        "knn_top1": final["knn_top1"],
        "knn_top5": final["knn_top5"],
        "epoch": final["epoch"],
    }
    if config.get("linear"):
        found.update(linear_eval(output, config["linear"], config["env"], cwd))
    tune.report({**found, "seconds": round(time.monotonic() - start, 1)})


def _cwd(config: dict[str, Any]) -> str | None:
    """Where a trial's commands run: the study's working directory where this node has it,
    so relative paths (``--data``, flags after ``--``) mean what they meant to the user;
    Tune has moved the trial into its own directory."""
    cwd = config.get("cwd")
    return cwd if cwd and Path(cwd).is_dir() else None


def linear_eval(
    run: Path, data: dict[str, str], env: dict[str, str], cwd: str | None = None
) -> dict[str, float]:
    """The linear SVM of ``python -m knn_service.linear`` (the paper's Table 1 protocol) on
    the run's exported encoder, trained on ``data["train"]``, scored on ``data["val"]``.

    A command, not an import: the serving layer sits above the trainer.
    """
    cmd = [sys.executable, "-m", "knn_service.linear", "--checkpoint", str(run / "encoder"),
           "--train-data", data["train"], "--val-data", data["val"],
           "--classifier", "svm"]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=cwd)
    (run / "linear.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"knn_service.linear exited {done.returncode}: {done.stderr[-300:]}")
    record = json.loads(done.stdout.strip().splitlines()[-1])
    return {"linear_top1": record["top1"], "linear_top5": record["top5"]}


def _trial_env() -> dict[str, str]:
    """The environment of a trial's ``trainer.run``: this cluster and its token mode."""
    import ray

    env = dict(os.environ)
    env["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    try:
        from ray._raylet import AuthenticationMode, get_authentication_mode

        if get_authentication_mode() == AuthenticationMode.TOKEN:
            env.setdefault("RAY_AUTH_MODE", "token")
    except ImportError:  # a Ray without token authentication
        pass
    return env


def run_study(args: argparse.Namespace, extra: list[str]) -> dict[str, Any]:
    """Run the grid on Ray Tune; returns the study record (also written to OUTPUT)."""
    import ray
    from ray import tune

    from featurestore.ray_connect import RayConnectError, connect
    from trainer.api import ShardIndex, dataset_location

    study = STUDIES[args.study]
    output = Path(args.output or f"runs/study-{study.name}").resolve()
    try:
        train = dataset_location(args.data, "train")
        num_train = ShardIndex.load(train).num_instances
    except (OSError, ValueError) as exc:
        raise StudyError(f"--data {args.data}: {exc}") from None
    try:
        val = dataset_location(args.val_data, "test")
        ShardIndex.load(val)
    except (OSError, ValueError) as exc:
        raise StudyError(f"--val-data {args.val_data}: {exc}") from None
    values = grid(study, args.values, num_train)
    try:
        started = connect(start_local=True, log_to_driver=False)
    except RayConnectError as exc:
        raise StudyError(str(exc)) from None
    common = ["--val-data", val, "--seed", str(args.seed),
              "--num-workers", str(args.workers_per_trial), *extra]  # fmt: skip
    # Trials read the data as shard paths (a subset, or the built-in's files), so the
    # trainer cannot tell the built-in's default epochs from a path's: say them here.
    epochs = args.epochs if args.epochs is not None else TrainConfig(data=args.data).resolved_epochs
    common += ["--epochs", str(epochs)]
    env = _trial_env()
    configs = []
    for value in values:
        data = train
        if study.name == "data-fraction":
            data = subset_data(train, value, args.seed, output / "data")
        configs.append(
            {
                "value": value,
                "flags": [*trial_flags(study, value, data, num_train), *common],
                "output": str(output / "trials" / f"{study.name}={value}"),
                "env": env,
                "cwd": os.getcwd(),
                "linear": {"train": train, "val": val} if args.linear else None,
            }
        )
    # A trial holds a sliver of a CPU; its Ray Train workers take one CPU each, so as many
    # trials run at once as leave every one of them its workers (the rest queue).
    cpus = ray.cluster_resources().get("CPU", 1)
    concurrent = max(1, int(cpus - TRIAL_CPU * len(configs)) // args.workers_per_trial)
    logger.info("%s: %d trials, %d at a time, in %s", study.name, len(configs), concurrent, output)
    start = time.monotonic()
    tuner = tune.Tuner(
        tune.with_resources(run_trial, {"cpu": TRIAL_CPU}),
        param_space={"trial": tune.grid_search(configs)},
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrent),
        run_config=tune.RunConfig(name=study.name, storage_path=str(output / "tune"), verbose=0),
    )
    results = tuner.fit()
    trials = []
    for result in results:
        config = result.config["trial"]
        metrics = result.metrics or {}
        trials.append(
            {
                "value": config["value"],
                "knn_top1": metrics.get("knn_top1"),
                "knn_top5": metrics.get("knn_top5"),
                "linear_top1": metrics.get("linear_top1"),
                "linear_top5": metrics.get("linear_top5"),
                "epochs": metrics.get("epoch"),
                "seconds": metrics.get("seconds"),
                "run": config["output"],
                "error": None if result.error is None else str(result.error).splitlines()[-1],
            }
        )
    order = {repr(v): i for i, v in enumerate(values)}
    trials.sort(key=lambda t: order[repr(t["value"])])
    if started:
        ray.shutdown()
    record = {
        "study": study.name,
        "varies": study.what,
        "data": args.data,
        "val_data": args.val_data,
        "trainer_flags": common,
        "trials": trials,
        "seconds": round(time.monotonic() - start, 1),
    }
    from trainer.experiments.study_report import write_report

    write_report(record, output)
    return record


def main(argv: list[str] | None = None) -> int:
    """Entry point; prints the study record (JSON) last, returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser().parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    if args.workers_per_trial < 1:
        print(f"{PROG}: --workers-per-trial must be >= 1", file=sys.stderr)
        return 2
    try:
        record = run_study(args, extra)
    except StudyError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(record))
    failed = [t for t in record["trials"] if t["error"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
