"""One run with every fault a shared cluster deals out, against undisturbed runs (issue 25).

A token-authenticated ``ray start --head`` on loopback plays the cluster; the runs are
``ray job submit -- python -m trainer.run`` on the built-in digits with 2 Ray Train
workers and a 2-shard feature store (snapshots at every checkpoint), as a user submits
them. First ``--seeds`` undisturbed runs measure the seed-to-seed spread; then the chaos
run (seed ``--chaos-seed``), during which, at seeded random steps (20 to 70 % into three
distinct epochs, whatever the machine's speed):

1. one store shard actor's process is SIGKILLed (Ray restarts it from the newest
   snapshot; the rows of that shard roll back to it),
2. one Ray Train worker process is SIGKILLed (Ray Train restarts the group from the
   last checkpoint, which restores the whole bank to its snapshot),
3. the driver is stopped with ``ray job stop``; the run is then resubmitted with
   ``--resume`` and must finish by itself.

Reported per fault: the store step when it struck, the step training went back to (steps
repeated), the bank rows rolled back, and the log lines the run printed about it; for the
run: the final kNN top-1 (bank and recomputed features) against the undisturbed range, and
the wall time lost against the undisturbed median.

``python benchmarks/chaos.py`` (3 undisturbed seeds, 10 epochs, ~15 min on 2 cores);
``tests/test_chaos.py`` runs ``--seeds`` none and 6 epochs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.ray_head import Head, submit, token_head  # noqa: E402

#: Lines of a job's log that report a fault or what was done about it.
FAULT_LINE = re.compile(
    r"restarted|resumed at|unavailable|retry|Worker group|worker group|failed|died|"
    r"SIGKILL|SIGTERM|killed|lost",
)
RESTARTED = re.compile(
    r"shard (\d+) of store '[^']+' restarted: rows \[(\d+), (\d+)\) reloaded from snapshot "
    r"(\S+) \(step (\d+)\)"
)
RESUMED = re.compile(r"resumed at epoch (\d+), step (\d+)")
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


WORKERS = 2
"""Ray Train workers: each steps the store, so its counter advances by 2 a training step."""


@dataclass
class Fault:
    """One injected fault and what it cost (steps are training steps)."""

    kind: str
    epoch: int
    """Scheduled in this epoch (1-based), at the fraction :attr:`into` of its steps; where
    it struck is :attr:`struck_epoch` (the client polls the store's step counter)."""
    into: float
    at_step: int = -1
    """The training step when it struck (the store's step counter / workers)."""
    resumed_at_step: int = -1
    """The step training went back to (a worker failure or ``--resume``; -1: none)."""
    rows_rolled_back: int = 0
    rows_back_to_step: int = -1
    lines: list[str] = field(default_factory=list)
    struck_epoch: int = -1

    @property
    def steps_repeated(self) -> int:
        if self.resumed_at_step < 0 or self.at_step < 0:
            return 0
        return max(0, self.at_step - self.resumed_at_step)


@dataclass
class Outcome:
    """One run: its status, final kNN top-1 (bank, recomputed) and wall seconds."""

    seed: int
    status: str
    knn_bank: float | None
    knn_recomputed: float | None
    wall_s: float
    epochs: list[int]
    store_shards_left: int = 0
    """Live store shard actors after the run ended (its store is detached: 0 = cleaned up)."""


def entrypoint(output: Path, seed: int, epochs: int, resume: bool = False) -> list[str]:
    """The user's command: ``python -m trainer.run`` with 2 workers and 2 store shards
    (batch 32: 45 steps an epoch, so that a fault lands inside one)."""
    cmd = ["python", "-m", "trainer.run", "--num-workers", "2", "--num-shards", "2",
           "--epochs", str(epochs), "--seed", str(seed), "--output", str(output),
           "--batch-size", "32", "--no-progress"]  # fmt: skip
    return [*cmd, "--resume"] if resume else cmd


def records(output: Path) -> list[dict]:
    path = output / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            break
    return out


def outcome(output: Path, seed: int, status: str, wall_s: float) -> Outcome:
    recs = records(output)
    bank = [r for r in recs if "knn_top1" in r and r.get("features") != "recomputed"]
    recomputed = [r for r in recs if r.get("features") == "recomputed"]
    return Outcome(
        seed=seed,
        status=status,
        knn_bank=bank[-1]["knn_top1"] if bank else None,
        knn_recomputed=recomputed[-1]["knn_top1"] if recomputed else None,
        wall_s=wall_s,
        epochs=[r["epoch"] for r in recs],
    )


class Cluster:
    """This process as a client of the head: jobs, actors, the store's step counter."""

    def __init__(self, head: Head) -> None:
        os.environ.update({k: v for k, v in head.env.items() if k.startswith("RAY_AUTH")})
        import ray
        from ray.job_submission import JobSubmissionClient

        self.head = head
        self.jobs = JobSubmissionClient(head.dashboard_url)
        self._shard0 = None  # the run's shard 0 actor, for its step counter
        ray.init(address=head.address, log_to_driver=False, logging_level="ERROR")

    def close(self) -> None:
        import ray

        ray.shutdown()

    def wait(self, job: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = str(self.jobs.get_job_status(job).value)
            if status in TERMINAL:
                return status
            time.sleep(2)
        raise TimeoutError(f"job {job} not finished after {timeout:.0f} s")

    def logs(self, job: str) -> str:
        return self.jobs.get_job_logs(job)

    def actors(self, class_name: str) -> list:
        from ray.util.state import list_actors

        return list_actors(
            address=self.head.dashboard_url,
            filters=[("class_name", "=", class_name), ("state", "=", "ALIVE")],
            limit=100,
            raise_on_missing_output=False,
        )

    def store_step(self) -> int:
        """The step counter of the run's store (the newest live one; -1: none reachable)."""
        import ray

        if self._shard0 is not None:
            try:
                return int(ray.get(self._shard0.state.remote(), timeout=30)[0])
            except Exception:  # restarting, or the run's store is gone: look it up again
                self._shard0 = None
        shards = [a for a in self.actors("ShardActor") if (a.name or "").endswith(".shard0")]
        if not shards:
            return -1
        try:
            self._shard0 = ray.get_actor(shards[-1].name, namespace=shards[-1].ray_namespace)
            return int(ray.get(self._shard0.state.remote(), timeout=30)[0])
        except Exception:  # a shard between restarts: unknown
            self._shard0 = None
            return -1

    def sigkill(self, class_name: str, rng: random.Random) -> str:
        """SIGKILL one live actor process of ``class_name``; returns its name or pid."""
        live = [a for a in self.actors(class_name) if a.pid]
        if not live:
            raise RuntimeError(f"no live {class_name} actor to kill")
        victim = rng.choice(sorted(live, key=lambda a: a.name or str(a.pid)))
        os.kill(int(victim.pid), signal.SIGKILL)
        return victim.name or f"pid {victim.pid}"


def wait_for_epoch(output: Path, epoch: int, job: str, cluster: Cluster, timeout: float) -> None:
    """Until ``metrics.jsonl`` shows ``epoch`` epochs done (its record with that epoch)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(r["epoch"] >= epoch for r in records(output)):
            return
        if str(cluster.jobs.get_job_status(job).value) in TERMINAL:
            raise RuntimeError(
                f"job {job} ended before epoch {epoch}:\n{cluster.logs(job)[-3000:]}"
            )
        time.sleep(1)
    raise TimeoutError(f"epoch {epoch} not reached after {timeout:.0f} s")


def wait_for_step(step: int, job: str, cluster: Cluster, timeout: float) -> None:
    """Until the run's store has counted ``step`` training steps (its counter / workers):
    a fault strikes at a step, whatever the machine's speed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cluster.store_step() // WORKERS >= step:
            return
        if str(cluster.jobs.get_job_status(job).value) in TERMINAL:
            raise RuntimeError(f"job {job} ended before step {step}: use more --epochs")
        time.sleep(0.1)
    raise TimeoutError(f"step {step} not reached after {timeout:.0f} s")


def start_job(head: Head, entry: list[str], job: str) -> None:
    """``ray job submit --no-wait --submission-id JOB -- ENTRY``; raises when refused."""
    done = submit(head, entry, REPO, no_wait=True, submission_id=job)
    if done.returncode != 0:
        raise RuntimeError(f"ray job submit {job} failed: {done.stderr[-2000:]}")


def run_undisturbed(head: Head, cluster: Cluster, work: Path, seed: int, epochs: int) -> Outcome:
    output = work / f"undisturbed-{seed}"
    job = f"undisturbed-{seed}-{uuid.uuid4().hex[:6]}"
    start = time.monotonic()
    start_job(head, entrypoint(output, seed, epochs), job)
    status = cluster.wait(job, timeout=60 * epochs + 600)
    result = outcome(output, seed, status, time.monotonic() - start)
    result.store_shards_left = len(cluster.actors("ShardActor"))
    return result


def fault_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if FAULT_LINE.search(line)]


def run_chaos(
    head: Head, cluster: Cluster, work: Path, seed: int, epochs: int
) -> tuple[Outcome, list[Fault]]:
    """The chaos run: three faults at seeded moments in three distinct epochs, then
    ``--resume``; returns its outcome and the faults with their costs."""
    rng = random.Random(seed)
    at = sorted(rng.sample(range(2, epochs), 3))  # epochs 2 .. E-1 (1-based): a checkpoint before
    faults = [
        Fault(kind, e, round(rng.uniform(0.2, 0.7), 2))
        for kind, e in zip(("shard SIGKILL", "worker SIGKILL", "ray job stop"), at, strict=True)
    ]
    output = work / f"chaos-{seed}"
    first = f"chaos-{seed}-{uuid.uuid4().hex[:6]}"
    start = time.monotonic()
    start_job(head, entrypoint(output, seed, epochs), first)
    logs, seen = [], 0
    for k, fault in enumerate(faults):
        wait_for_epoch(output, fault.epoch - 1, first, cluster, timeout=60 * epochs + 600)
        per_epoch = next(r["step"] for r in records(output) if r["epoch"] == 1 and r["step"])
        target = (fault.epoch - 1) * per_epoch + round(fault.into * per_epoch)
        wait_for_step(target, first, cluster, timeout=60 * epochs + 600)
        text = cluster.logs(first)
        if k:  # what the run printed since the fault before
            logs.append(text[seen:])
        seen = len(text)
        fault.at_step = max(-1, cluster.store_step() // WORKERS)
        if fault.kind == "shard SIGKILL":
            cluster.sigkill("ShardActor", rng)
        elif fault.kind == "worker SIGKILL":
            cluster.sigkill("RayTrainWorker", rng)
        else:
            cluster.jobs.stop_job(first)
            cluster.wait(first, timeout=300)
        time.sleep(1)
    second = f"chaos-{seed}-resume-{uuid.uuid4().hex[:6]}"
    start_job(head, entrypoint(output, seed, epochs, resume=True), second)
    status = cluster.wait(second, timeout=60 * epochs + 600)
    wall = time.monotonic() - start
    logs.append(cluster.logs(first)[seen:] + cluster.logs(second))  # the stop and the resume
    account(faults, logs)
    done_run = outcome(output, seed, status, wall)
    per_epoch = next((r["step"] for r in records(output) if r["epoch"] == 1), 0)
    for fault in faults:
        if per_epoch and fault.at_step >= 0:
            fault.struck_epoch = fault.at_step // per_epoch + 1
    done_run.store_shards_left = len(cluster.actors("ShardActor"))  # detached: must be gone
    return done_run, faults


def account(faults: list[Fault], logs: list[str]) -> None:
    """Fill in each fault's rollback and log lines from the lines each one was followed by
    (``logs[k]``: what the run printed between fault ``k`` and the next one)."""
    for fault, text in zip(faults, logs, strict=True):
        fault.lines = fault_lines(text)
        for line in fault.lines:
            if (m := RESTARTED.search(line)) and fault.rows_back_to_step < 0:
                fault.rows_rolled_back = int(m.group(3)) - int(m.group(2))
                fault.rows_back_to_step = int(m.group(5)) // WORKERS
            if m := RESUMED.search(line):
                fault.resumed_at_step = int(m.group(2))


def table(clean: list[Outcome], chaos: Outcome, faults: list[Fault], num_rows: int) -> str:
    """The README's tables: the faults and what each cost, the runs' outcomes."""
    rows = ["| fault | in epoch | at step | training went back to step | steps repeated | "
            "bank rows rolled back (to step) |", "|---|---|---|---|---|---|"]  # fmt: skip
    for f in faults:
        back = f.resumed_at_step if f.resumed_at_step >= 0 else "- (goes on)"
        if f.resumed_at_step >= 0:
            rolled = f"all {num_rows} ({f.resumed_at_step})"
        else:
            rolled = f"{f.rows_rolled_back} ({f.rows_back_to_step})"
        rows.append(
            f"| {f.kind} | {f.struck_epoch} | {f.at_step} | {back} | {f.steps_repeated} | "
            f"{rolled} |"
        )
    out = "\n".join(rows) + "\n\n"
    out += "| run | status | kNN top-1 (bank) | kNN top-1 (recomputed) | wall s |\n"
    out += "|---|---|---|---|---|\n"
    for o in [*clean, chaos]:
        name = f"chaos seed {o.seed}" if o is chaos else f"undisturbed seed {o.seed}"
        bank = "-" if o.knn_bank is None else f"{100 * o.knn_bank:.1f} %"
        rec = "-" if o.knn_recomputed is None else f"{100 * o.knn_recomputed:.1f} %"
        out += f"| {name} | {o.status} | {bank} | {rec} | {o.wall_s:.0f} |\n"
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2],
                   help="undisturbed runs' seeds (none: only the chaos run)")  # fmt: skip
    p.add_argument("--chaos-seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--output", type=Path, default=None, help="work directory (default: a temp dir)")
    p.add_argument("--json", type=Path, default=None, help="write the report here")
    args = p.parse_args(argv)
    if args.epochs < 4:
        p.error("--epochs must be at least 4 (three faults in distinct epochs after the first)")
    work = args.output or Path(tempfile.mkdtemp(prefix="npid-chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    with token_head(work / "cache") as head:
        cluster = Cluster(head)
        try:
            clean = [run_undisturbed(head, cluster, work, s, args.epochs) for s in args.seeds]
            chaos, faults = run_chaos(head, cluster, work, args.chaos_seed, args.epochs)
        finally:
            cluster.close()  # before the head goes: a client left behind aborts this process
    from trainer.data import ShardIndex
    from trainer.shards.make import ensure_builtin_dataset

    num_rows = ShardIndex.load(ensure_builtin_dataset(work / "cache", "train")).num_instances
    bank = [o.knn_bank for o in clean if o.knn_bank is not None]
    recomputed = [o.knn_recomputed for o in clean if o.knn_recomputed is not None]
    report = {
        "undisturbed": [asdict(o) for o in clean],
        "chaos": asdict(chaos),
        "faults": [{**asdict(f), "steps_repeated": f.steps_repeated} for f in faults],
        "steps_repeated": sum(f.steps_repeated for f in faults),
        "num_rows": num_rows,
        "undisturbed_range": [min(bank), max(bank)] if bank else None,
        "undisturbed_range_recomputed": [min(recomputed), max(recomputed)] if recomputed else None,
        "within_range": bool(bank)
        and chaos.knn_bank is not None
        and min(bank) <= chaos.knn_bank <= max(bank),
        "within_range_recomputed": bool(recomputed)
        and chaos.knn_recomputed is not None
        and min(recomputed) <= chaos.knn_recomputed <= max(recomputed),
        "wall_lost_s": chaos.wall_s - statistics.median(o.wall_s for o in clean) if clean else None,
    }
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    print(table(clean, chaos, faults, num_rows))
    for f in faults:
        print(f"\n{f.kind} (step {f.at_step}, epoch {f.struck_epoch}): what the run said")
        for line in f.lines:
            print(f"    {line[:300]}")
    if report["wall_lost_s"] is not None:
        print(f"\nwall time lost against the undisturbed median: {report['wall_lost_s']:.0f} s")
    for what, values, key in (("bank", bank, "within_range"),
                              ("recomputed", recomputed, "within_range_recomputed")):  # fmt: skip
        if values:
            got = getattr(chaos, f"knn_{what}")
            print(f"final kNN ({what}) {got} against undisturbed {min(values)} .. "
                  f"{max(values)}: {'within' if report[key] else 'OUTSIDE'} the range")  # fmt: skip
    return 0 if chaos.status == "SUCCEEDED" else 1


if __name__ == "__main__":
    raise SystemExit(main())
