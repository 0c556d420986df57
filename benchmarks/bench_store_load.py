"""The feature store under load, checked against a sequential model (issue 25).

``--clients`` Ray tasks attach to one ``--shards``-shard store of ``--num-rows`` rows and
step it (sampled softmax, ``--batch`` positives and ``--negatives`` noise rows per step) as
fast as they can for ``--seconds``. Each client owns the ids ``i % clients == c`` and
records every step it made (ids and features). Afterwards the store's rows are compared
with a sequential replay of those histories on an in-process :class:`MemoryBank` built from
the same seed: an update lost, applied twice or applied to only some shards (torn) shows
as a row that differs. Reported: steps/s, p50/p99 step latency, rows checked, rows that
differ, the largest difference.

Full size: ``python benchmarks/bench_store_load.py`` (1M rows, 4 shards, 8 clients, 60 s);
``tests/test_store_load.py`` runs a small one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from dataclasses import dataclass

import torch

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray

from featurestore import MemoryBank, SampledSoftmax, ShardedStore
from featurestore.store import actor_name

NAMESPACE = "npid-load"


@dataclass
class LoadResult:
    """What one load run measured and found."""

    steps: int
    seconds: float
    latencies: list[float]
    rows_checked: int
    rows_differing: int
    max_difference: float
    killed_shard: int | None = None
    """The shard killed mid-load (after a snapshot), or None."""
    rows_rolled_back: int = 0
    """Rows of the killed shard whose updates between its snapshot and the kill were lost."""
    updates_lost: int = 0

    @property
    def steps_per_second(self) -> float:
        """All clients' steps per wall-clock second."""
        return self.steps / self.seconds

    def quantile(self, q: float) -> float:
        """Step latency quantile ``q`` in seconds (all clients)."""
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@ray.remote(num_cpus=0)
def _client(name: str, namespace: str, client: int, clients: int, num_rows: int, dim: int,
            batch: int, negatives: int, seconds: float, max_steps: int):  # fmt: skip
    """Step the store until ``seconds`` or ``max_steps``; ``(history, latencies)`` with
    history ``[(ids [B], feats [B, d]), ...]`` in the order this client stepped."""
    store = ShardedStore.attach(name, namespace)
    own = torch.arange(client, num_rows, clients)
    g = torch.Generator().manual_seed(1000 + client)
    objective = SampledSoftmax(num_negatives=negatives)
    history, latencies = [], []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and len(history) < max_steps:
        ids = own[torch.randperm(len(own), generator=g)[:batch]]
        feats = torch.nn.functional.normalize(torch.randn(len(ids), dim, generator=g), dim=1)
        start = time.perf_counter()
        store.step(feats, ids, objective)
        latencies.append(time.perf_counter() - start)
        history.append((ids, feats))
    return history, latencies


def run_load(*, num_rows: int, dim: int, shards: int, clients: int, batch: int,
             negatives: int, seconds: float, max_steps: int = 10**9, seed: int = 0,
             momentum: float = 0.5, namespace: str = NAMESPACE,
             kill_after_s: float | None = None,
             lost_window_s: float = 0.5) -> LoadResult:  # fmt: skip
    """One load run against a fresh store (Ray must be initialised); the store is shut down
    at the end.

    With ``kill_after_s``: that long after the first step a snapshot is taken and,
    ``lost_window_s`` later (steps the snapshot does not hold), the last shard's actor
    killed while the clients keep stepping; it restarts from the snapshot.
    Its rows are then checked against the model with that rollback: each row must be the
    snapshot's value (itself a prefix of the row's updates) followed by a suffix of its
    updates, the ones in between lost (counted), none doubled or torn."""
    import tempfile

    name = f"load-{uuid.uuid4().hex[:8]}"
    snaps = tempfile.mkdtemp(prefix="npid-load-") if kill_after_s is not None else None
    store = ShardedStore(num_rows, dim, num_shards=shards, momentum=momentum, seed=seed,
                         name=name, namespace=namespace, snapshot_dir=snaps)  # fmt: skip
    try:
        start = time.perf_counter()
        refs = [
            _client.remote(
                name, namespace, c, clients, num_rows, dim, batch, negatives, seconds, max_steps
            )
            for c in range(clients)
        ]
        killed, snapshot_uri = None, None
        if kill_after_s is not None:
            stepping = time.monotonic() + seconds
            while store.state()[0] == 0 and time.monotonic() < stepping:
                time.sleep(0.05)  # counted from the first step: the clients take a while to start
            time.sleep(kill_after_s)
            snapshot_uri = store.snapshot()
            time.sleep(lost_window_s)  # updates the rollback will lose
            killed = shards - 1
            ray.kill(ray.get_actor(actor_name(name, killed), namespace=namespace),
                     no_restart=False)  # fmt: skip
        results = ray.get(refs)
        elapsed = time.perf_counter() - start
        model = MemoryBank(num_rows, dim, momentum=momentum, seed=seed)
        initial = model.rows.clone()
        touched = []
        for history, _ in results:  # each client's rows are its own: its order is the order
            for ids, feats in history:
                model.update(ids, feats)
                touched.append(ids)
        checked = torch.unique(torch.cat(touched)) if touched else torch.zeros(0, dtype=torch.long)
        got, want = store.get(checked), model.get(checked)
        diff = (got - want).abs().amax(dim=1) if len(checked) else torch.zeros(0)
        result = LoadResult(
            steps=sum(len(h) for h, _ in results),
            seconds=elapsed,
            latencies=[t for _, lat in results for t in lat],
            rows_checked=len(checked),
            rows_differing=0,
            max_difference=0.0,
            killed_shard=killed,
        )
        if killed is not None:  # the killed shard's rows: against the model with rollback
            lo, hi = store.bounds[killed], store.bounds[killed + 1]
            mine = (checked >= lo) & (checked < hi)
            diff = diff[~mine]
            rolled = check_rolled_back(results, checked[mine], got[mine], initial,
                                       snapshot_uri, lo, hi, momentum)  # fmt: skip
            result.rows_differing += rolled[0]
            result.rows_rolled_back, result.updates_lost = rolled[1], rolled[2]
        result.rows_differing += int((diff > TOLERANCE).sum())
        result.max_difference = float(diff.max()) if len(diff) else 0.0
        return result
    finally:
        store.shutdown()
        if snaps is not None:
            import shutil

            shutil.rmtree(snaps, ignore_errors=True)


#: Largest difference from the model that counts as equal (float32 arithmetic, same order).
TOLERANCE = 1e-6


def check_rolled_back(results, ids: torch.Tensor, final: torch.Tensor, initial: torch.Tensor,
                      snapshot_uri: str, lo: int, hi: int,
                      momentum: float) -> tuple[int, int, int]:  # fmt: skip
    """``(rows that match no rollback, rows rolled back, updates lost)`` for the rows
    ``ids`` of a shard that restarted from ``snapshot_uri``: each row's value there must be
    its first ``i`` updates, and its final value the snapshot's followed by its updates
    after some ``j >= i`` (``j - i`` lost)."""
    from featurestore import snapshot

    manifest = snapshot.read_manifest(snapshot_uri)
    snap = snapshot.read_rows(manifest, lo, hi, torch.empty(hi - lo, initial.shape[1]))
    updates: dict[int, list[torch.Tensor]] = {int(i): [] for i in ids}
    for history, _ in results:
        for step_ids, feats in history:
            for k in torch.nonzero((step_ids >= lo) & (step_ids < hi)).flatten().tolist():
                updates[int(step_ids[k])].append(feats[k])
    one = MemoryBank(1, initial.shape[1], momentum=momentum)

    def replay(value: torch.Tensor, feats: list[torch.Tensor]) -> torch.Tensor:
        one.set(torch.zeros(1, dtype=torch.long), value[None])
        for f in feats:
            one.update(torch.zeros(1, dtype=torch.long), f[None])
        return one.get(torch.zeros(1, dtype=torch.long))[0]

    def same(a: torch.Tensor, b: torch.Tensor) -> bool:
        return float((a - b).abs().max()) <= TOLERANCE

    bad = rolled = lost = 0
    for row, value in zip(ids.tolist(), final, strict=True):
        u, at = updates[row], snap[row - lo]
        prefixes = [i for i in range(len(u) + 1) if same(replay(initial[row], u[:i]), at)]
        ends = [(i, j) for i in prefixes for j in range(i, len(u) + 1)
                if same(replay(at, u[j:]), value)]  # fmt: skip
        if not ends:
            bad += 1
            continue
        i, j = min(ends, key=lambda e: e[1] - e[0])
        rolled += j > i
        lost += j - i
    return bad, rolled, lost


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--num-rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--negatives", type=int, default=4096)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="of the local Ray")
    p.add_argument("--kill-after", type=float, default=None, metavar="SECONDS",
                   help="snapshot, then kill the last shard this long into the load")  # fmt: skip
    p.add_argument("--lost-window", type=float, default=2.0, metavar="SECONDS",
                   help="with --kill-after: snapshot to kill (updates lost)")  # fmt: skip
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1", namespace=NAMESPACE)  # fmt: skip
    try:
        r = run_load(num_rows=args.num_rows, dim=args.dim, shards=args.shards,
                     clients=args.clients, batch=args.batch, negatives=args.negatives,
                     seconds=args.seconds, kill_after_s=args.kill_after,
                     lost_window_s=args.lost_window)  # fmt: skip
    finally:
        ray.shutdown()
    print(
        f"store under load: N={args.num_rows} d={args.dim} shards={args.shards} "
        f"clients={args.clients} B={args.batch} K={args.negatives} {args.seconds:g} s"
    )
    print("| steps | steps/s | p50 ms | p99 ms | rows checked | rows differing | max diff |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {r.steps} | {r.steps_per_second:.1f} | {1e3 * r.quantile(0.5):.1f} | "
          f"{1e3 * r.quantile(0.99):.1f} | {r.rows_checked} | {r.rows_differing} | "
          f"{r.max_difference:.2e} |")  # fmt: skip
    print(f"median latency {1e3 * statistics.median(r.latencies):.1f} ms")
    if r.killed_shard is not None:
        print(f"shard {r.killed_shard} killed after {args.kill_after:g} s (a snapshot just "
              f"before): {r.rows_rolled_back} of its rows rolled back to the snapshot, "
              f"{r.updates_lost} updates lost by that rollback; none doubled or torn "
              f"({r.rows_differing} rows match no rollback)")  # fmt: skip
    return 0 if r.rows_differing == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
