"""ShardedStore faults: shard restarts, snapshots, restore/resharding, retries, bad snapshots."""

from __future__ import annotations

import itertools
import logging
import shutil
import threading
import time
import uuid
from pathlib import Path

import pytest
import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError
from reference import unit

from featurestore import NCE, MemoryBank, SampledSoftmax, ShardedStore, wire
from featurestore import snapshot as snapshot_module
from featurestore.bank_shard import initial_rows
from featurestore.noise import NoiseSpec
from featurestore.shard_protocol import StepRequest
from featurestore.store import actor_name

pytestmark = pytest.mark.ray

N, D, B, K = 211, 16, 12, 40
NS = "npid-tests"


def close(a, b, tol=2e-5):
    torch.testing.assert_close(a.float().cpu(), b.float().cpu(), rtol=tol, atol=tol)


def batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    return (
        unit(B, D, seed + 100),
        torch.randperm(N, generator=g)[:B],
        torch.randint(0, N, (B, K), generator=g),
    )


def all_rows(store) -> torch.Tensor:
    return store.get(torch.arange(store.num_rows))


def lockstep(store, bank, seeds, objective=None):
    objective = objective or NCE(num_negatives=K)
    for i in seeds:
        f, ids, noise = batch(i)
        got = store.step(f, ids, objective, noise_ids=noise)
        want = bank.step(f, ids, objective, noise_ids=noise)
        close(got.grad, want.grad, tol=1e-5)


def kill_and_wait(store, shard: int) -> None:
    """Kill shard ``shard``'s actor and wait until its next incarnation answers.

    ``ray.kill`` is asynchronous: a call made right after it can still be served by the
    dying actor, with the rows from before the kill.
    """
    actor = ray.get_actor(actor_name(store.name, shard), namespace=NS)
    old = ray.get(actor.info.remote())["stamp"].instance
    ray.kill(actor, no_restart=False)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if ray.get(actor.info.remote(), timeout=10)["stamp"].instance != old:
                return
        except (RayActorError, GetTimeoutError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"shard {shard} of {store.name} did not restart within 120 s")


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_attaching_while_a_shard_restarts_waits_for_it(make_store, tmp_path):
    """A client that attaches right after a shard was killed (a worker starting while the
    cluster recovers) gets the store once the shard is back, not ActorUnavailableError (as
    a load client did in CI)."""
    store = make_store(num_rows=N, dim=D, num_shards=3, seed=23, snapshot_dir=str(tmp_path))
    bank = MemoryBank(N, D, seed=23)
    lockstep(store, bank, range(2))
    store.snapshot()
    for shard in (2, 0, 1):
        ray.kill(ray.get_actor(actor_name(store.name, shard), namespace=NS), no_restart=False)
        other = ShardedStore.attach(store.name, NS)  # at once: the shard is down or restarting
        close(other.get(torch.arange(N)), bank.rows)  # the snapshot's rows, whole


def test_killed_shard_restarts_from_its_latest_snapshot(make_store, tmp_path, caplog):
    store = make_store(num_rows=N, dim=D, num_shards=2, seed=21, snapshot_dir=str(tmp_path))
    bank = MemoryBank(N, D, seed=21)
    lockstep(store, bank, range(3))
    uri = store.snapshot()
    assert uri == snapshot_module.join(str(tmp_path), "step-000000003")
    at_snapshot = all_rows(store)
    lockstep(store, bank, range(3, 5))
    before = all_rows(store)
    kill_and_wait(store, 1)
    with caplog.at_level(logging.WARNING, logger="featurestore.store"):
        rows = all_rows(store)  # the store notices the new incarnation
    lo = store.bounds[1]
    assert torch.equal(rows[lo:], at_snapshot[lo:])  # shard 1: back to the snapshot
    assert torch.equal(rows[:lo], before[:lo])  # shard 0: untouched
    assert store.restarts == [0, 1]
    assert "store is at step 5: up to 2 steps of updates to those rows were lost" in caplog.text
    stamp = store.shard_info()[1]["stamp"]
    assert stamp.reconstructed and stamp.loaded_from == uri and stamp.loaded_step == 3
    assert store.z == pytest.approx(bank.z) and store.step_count == 5
    bank.set(torch.arange(lo, N), at_snapshot[lo:])  # what the store now holds
    lockstep(store, bank, range(5, 7))
    close(all_rows(store), bank.rows, tol=1e-6)


def test_killing_shard_zero_mid_run_keeps_z_counter_and_answers(make_store, tmp_path):
    store = make_store(
        num_rows=N, dim=D, num_shards=2, seed=22, snapshot_dir=str(tmp_path), snapshot_every_steps=5
    )
    f, ids, _ = batch(22)
    z = store.step(f, ids, NCE(num_negatives=K)).z
    done, errors = [], []

    def run():
        try:
            for _ in range(60):
                out = store.step(f, ids, NCE(num_negatives=K))
                assert out.z == z
                done.append(1)
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    worker = threading.Thread(target=run)
    worker.start()
    while len(done) < 12:
        threading.Event().wait(0.01)
    ray.kill(ray.get_actor(actor_name(store.name, 0), namespace=NS), no_restart=False)
    worker.join()
    assert not errors and len(done) == 60
    assert store.restarts[0] == 1
    assert store.z == z
    assert store.step_count >= 61  # clients push the counter past the snapshot's step
    store.wait_for_snapshots()  # automatic snapshots are written off the step's path
    steps = [m.step for m in snapshot_module.list_snapshots(str(tmp_path))]
    assert len(steps) == 3 and steps[0] >= 40  # automatic, newest first, last 3 kept


def test_restart_without_snapshot_starts_from_seeded_rows(make_store, caplog):
    store = make_store(num_rows=N, dim=D, num_shards=2, seed=23)
    f, ids, noise = batch(23)
    z = store.step(f, ids, NCE(num_negatives=K), noise_ids=noise).z
    kill_and_wait(store, 0)
    with caplog.at_level(logging.WARNING, logger="featurestore.store"):
        rows = all_rows(store)
    lo = store.bounds[1]
    assert torch.equal(rows[:lo], initial_rows(23, 0, lo, D))
    assert "seeded initial rows (no snapshot)" in caplog.text
    assert "1 steps of updates to those rows were lost" in caplog.text
    assert store.state()[1] is None  # shard 0 lost Z ...
    assert store.step(f, ids, NCE(num_negatives=K)).z == z  # ... a client that knows it restores it
    assert store.z == z


def test_a_retried_request_is_not_applied_twice(make_store):
    store = make_store(num_rows=N, dim=D, num_shards=1, seed=24)
    bank = MemoryBank(N, D, seed=24)
    actor = store._group.actors[0]
    f, ids, noise = batch(24)
    ray.get([actor.update.remote("req-1", ids, f) for _ in range(2)])
    bank.update(ids, f)
    close(all_rows(store), bank.rows, tol=0)
    obj = SampledSoftmax(num_negatives=K)
    spec = NoiseSpec(K, False, 0, noise)
    ray.get(actor.register_objective.remote("sampled", obj.to_dict()))
    args = (StepRequest(1, "req-2", ids, "sampled", spec, None, 0, None), f)
    replies = ray.get([actor.step.remote(*args) for _ in range(2)])
    (_, (first, _)), (_, (again, _)) = (wire.from_pieces(r) for r in replies)
    assert (first["weighted"] == again["weighted"]).all()
    bank.step(f, ids, obj, noise_ids=noise)
    close(all_rows(store), bank.rows, tol=0)


def test_interrupted_snapshot_leaves_the_previous_one_usable(make_store, tmp_path, monkeypatch):
    store = make_store(num_rows=N, dim=D, num_shards=2, seed=25, snapshot_dir=str(tmp_path))
    bank = MemoryBank(N, D, seed=25)
    lockstep(store, bank, range(2))
    first = store.snapshot()
    at_first = all_rows(store)
    lockstep(store, bank, range(2, 4))

    def crash(manifest, **_):  # dies after every shard file is written, before the commit
        assert len(list(Path(manifest.uri).glob("shard-*.parquet"))) == 2
        raise KeyboardInterrupt("killed before the manifest")

    monkeypatch.setattr(snapshot_module, "write_manifest", crash)
    with pytest.raises(KeyboardInterrupt):
        store.snapshot()
    assert snapshot_module.latest_snapshot(str(tmp_path)) == first
    assert [p.name for p in tmp_path.iterdir()] == ["step-000000002"]  # debris removed
    monkeypatch.setattr(snapshot_module, "remove_snapshot", lambda uri: None)  # a hard crash
    with pytest.raises(KeyboardInterrupt):
        store.snapshot()
    partial = tmp_path / "step-000000004"
    assert partial.is_dir() and not (partial / "manifest.json").exists()
    assert snapshot_module.latest_snapshot(str(tmp_path)) == first
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match="step-000000004"):
        ShardedStore.restore(str(partial), name=unique("partial"), namespace=NS)
    restored = ShardedStore.restore(str(tmp_path), num_shards=3, name=unique("r"), namespace=NS)
    make_store.track(restored)
    assert restored.num_shards == 3 and restored.step_count == 2
    assert torch.equal(all_rows(restored), at_first)
    assert restored.z == pytest.approx(store.z)


def test_restore_into_other_shard_counts_and_load(make_store, tmp_path):
    store = make_store(num_rows=N, dim=D, num_shards=3, seed=26, dtype="bfloat16")
    lockstep(store, MemoryBank(N, D, seed=26, dtype="bfloat16"), range(3))
    uri = str(tmp_path / "snap")
    assert store.snapshot(uri) == uri
    with pytest.raises(FileExistsError, match="snap"):
        store.snapshot(uri)
    rows, z = all_rows(store), store.z
    two = ShardedStore.restore(uri, num_shards=2, name=unique("two"), namespace=NS)
    make_store.track(two)
    one = ShardedStore.restore(f"file://{uri}", num_shards=1, name=unique("one"), namespace=NS)
    make_store.track(one)
    for other in (two, one):
        assert torch.equal(all_rows(other), rows)
        assert other.z == z and other.step_count == 3 and other.dtype == torch.bfloat16
    f, ids, noise = batch(30)
    want = store.step(f, ids, NCE(num_negatives=K), noise_ids=noise)
    got = two.step(f, ids, NCE(num_negatives=K), noise_ids=noise)
    close(got.grad, want.grad, tol=1e-5)
    assert torch.equal(all_rows(two), all_rows(store))

    one.step(f, ids, NCE(num_negatives=K), noise_ids=noise)
    one.load_snapshot(uri)  # back to the snapshot: rows, Z, step
    assert torch.equal(all_rows(one), rows) and one.step_count == 3 and one.z == z

    # another shape: refused with the path in the message, the store unchanged
    wrong = str(tmp_path / "wrong")
    snapshot_module.write_shard_file(wrong, 0, 1, 0, torch.zeros(N + 1, D), {})
    snapshot_module.write_manifest(
        snapshot_module.Manifest(
            wrong, N + 1, D, "float32", 0.5, 0, None, 0, [0, N + 1],
            [snapshot_module.ShardFile("shard-00000-of-00001.parquet", 0, N + 1)],
        )
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"wrong.*212 rows"):
        one.load_snapshot(wrong)
    assert torch.equal(all_rows(one), rows)
    with pytest.raises(ValueError, match="num_rows=211, expected 5"):
        ShardedStore.restore(uri, num_rows=5, name=unique("x"), namespace=NS)
    with pytest.raises(TypeError, match="bogus"):
        ShardedStore.restore(uri, name=unique("x"), namespace=NS, bogus=1)
    with pytest.raises(ValueError, match="dim=16, expected 8"):
        ShardedStore.restore(uri, dim=8, name=unique("x"), namespace=NS)
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        ShardedStore.restore(str(tmp_path / "nothing-here"), name=unique("x"), namespace=NS)

    broken = tmp_path / "broken"
    shutil.copytree(uri, broken)
    (broken / "shard-00001-of-00003.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="shard-00001-of-00003"):
        ShardedStore.restore(str(broken), name=unique("x"), namespace=NS)
    (broken / "shard-00001-of-00003.parquet").write_bytes(b"not parquet" * 64)
    with pytest.raises(ValueError, match=r"shard-00001-of-00003\.parquet is corrupt"):
        ShardedStore.restore(str(broken), name=unique("x"), namespace=NS)
    with pytest.raises(ValueError, match="corrupt"):
        one.load_snapshot(str(broken))


def test_automatic_snapshots_by_steps_and_seconds(make_store, tmp_path):
    store = make_store(
        num_rows=N,
        dim=D,
        num_shards=2,
        seed=27,
        snapshot_dir=f"file://{tmp_path}",
        snapshot_every_steps=3,
        snapshot_every_seconds=2.0,
        keep_snapshots=2,
    )
    f, ids, _ = batch(27)
    obj = SampledSoftmax(num_negatives=K)
    for _ in range(3):
        store.step(f, ids, obj)
    store.wait_for_snapshots()
    assert [m.step for m in snapshot_module.list_snapshots(str(tmp_path))] == [3]
    threading.Event().wait(2.1)
    store.step(f, ids, obj)  # due by time
    store.wait_for_snapshots()
    for _ in range(3):
        store.step(f, ids, obj)  # due by steps at 7
    store.wait_for_snapshots()
    kept = snapshot_module.list_snapshots(str(tmp_path))
    assert [m.step for m in kept] == [7, 4]  # newest first; older ones pruned
    latest = snapshot_module.read_manifest(snapshot_module.latest_snapshot(str(tmp_path)))
    assert latest.store_id == store.config.store_id and latest.num_rows == N


def test_a_failed_automatic_snapshot_is_reported_and_retried_on_schedule(make_store, tmp_path):
    snaps = tmp_path / "snaps"
    store = make_store(
        num_rows=N,
        dim=D,
        num_shards=2,
        seed=29,
        snapshot_dir=str(snaps),
        snapshot_every_steps=2,
    )
    f, ids, _ = batch(29)
    obj = SampledSoftmax(num_negatives=K)
    for _ in range(2):
        store.step(f, ids, obj)
    store.wait_for_snapshots()
    assert [m.step for m in snapshot_module.list_snapshots(str(snaps))] == [2]
    shutil.move(snaps, tmp_path / "aside")
    snaps.write_text("not a directory")  # the next snapshot cannot be written
    for _ in range(2):
        store.step(f, ids, obj)  # due at 4: fails
    store.wait_for_snapshots()
    info = store.shard_info()[0]
    assert (info["last_snapshot_step"], info["snapshot_failures"]) == (2, 1)
    store.step(f, ids, obj)  # 5: not retried at every step
    assert store.shard_info()[0]["snapshot_failures"] == 1
    snaps.unlink()
    shutil.move(tmp_path / "aside", snaps)
    store.step(f, ids, obj)  # 6: one interval after the failed attempt
    store.wait_for_snapshots()
    info = store.shard_info()[0]
    assert (info["last_snapshot_step"], info["snapshot_failures"]) == (6, 1)
    assert [m.step for m in snapshot_module.list_snapshots(str(snaps))] == [6, 2]


class SmallDisk:
    """A tmpfs mounted at ``path``: ``used()`` bytes, ``resize(bytes)`` remounts it."""

    def __init__(self, path: Path):
        self.path = path

    def used(self) -> int:
        import os

        st = os.statvfs(self.path)
        return (st.f_blocks - st.f_bfree) * st.f_frsize

    def resize(self, size: int) -> None:
        import subprocess

        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], check=True)


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (root only: skipped elsewhere)."""
    import subprocess

    where = tmp_path / "small"
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)],
                             capture_output=True, text=True)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield SmallDisk(where)
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def snapshotted(make_store, disk: str, seed: int):
    """A 2-shard store snapshotting to ``disk`` every 2 steps, stepped twice (one snapshot
    written): ``(store, features, ids, objective, rows at step 2)``."""
    store = make_store(num_rows=N, dim=D, num_shards=2, seed=seed, snapshot_dir=disk,
                       snapshot_every_steps=2)  # fmt: skip
    f, ids, _ = batch(seed)
    obj = SampledSoftmax(num_negatives=K)
    for _ in range(2):
        store.step(f, ids, obj)
    store.wait_for_snapshots()
    return store, f, ids, obj, all_rows(store)


def test_a_full_disk_fails_the_snapshot_in_one_line_and_keeps_the_previous(
    make_store, small_disk, caplog
):
    disk = str(small_disk.path)
    store, f, ids, obj, rows_at_2 = snapshotted(make_store, disk, 31)
    (first,) = snapshot_module.list_snapshots(disk)
    small_disk.resize(small_disk.used() + 4096)  # room for a page, not for a snapshot
    with caplog.at_level(logging.ERROR, logger="featurestore.store_snapshots"):
        for _ in range(2):
            store.step(f, ids, obj)  # due at 4: the disk is full
        store.wait_for_snapshots()
    failed = [r for r in caplog.records if "automatic snapshot" in r.getMessage()]
    assert len(failed) == 1 and failed[0].exc_info is None
    line = failed[0].getMessage()
    assert "\n" not in line and "No space left on device" in line, line
    assert store.shard_info()[0]["snapshot_failures"] == 1
    kept = snapshot_module.list_snapshots(disk)
    assert [m.step for m in kept] == [2]  # the failed one left no debris behind
    other = make_store(num_rows=N, dim=D, num_shards=1, seed=1)
    other.load_snapshot(first.uri)
    close(all_rows(other), rows_at_2, tol=0)  # the previous snapshot is whole
    store.step(f, ids, obj)  # training goes on
    assert store.shard_info()[0]["step"] == 5


def test_a_snapshot_dir_that_loses_write_permission_fails_in_one_line_and_keeps_the_previous(
    make_store, small_disk, caplog
):
    """Write permission lost (a read-only remount: root ignores file modes) fails the
    snapshot in one line; the previous one stays loadable; writes resume once it is back."""
    import subprocess

    disk = str(small_disk.path)
    small_disk.resize(64 << 20)
    store, f, ids, obj, rows_at_2 = snapshotted(make_store, disk, 37)
    subprocess.run(["mount", "-o", "remount,ro", disk], check=True)
    try:
        with caplog.at_level(logging.ERROR, logger="featurestore.store_snapshots"):
            for _ in range(2):
                store.step(f, ids, obj)  # due at 4: read-only
            store.wait_for_snapshots()
    finally:
        subprocess.run(["mount", "-o", "remount,rw", disk], check=True)
    failed = [r.getMessage() for r in caplog.records if "automatic snapshot" in r.getMessage()]
    assert len(failed) == 1 and "\n" not in failed[0], failed
    assert "Read-only file system" in failed[0], failed[0]
    (kept,) = snapshot_module.list_snapshots(disk)
    other = make_store(num_rows=N, dim=D, num_shards=1, seed=1)
    other.load_snapshot(kept.uri)
    close(all_rows(other), rows_at_2, tol=0)
    for _ in range(2):
        store.step(f, ids, obj)  # 6: one interval after the failed attempt, writable again
    store.wait_for_snapshots()
    assert [m.step for m in snapshot_module.list_snapshots(disk)] == [6, 2]


def test_a_snapshot_dir_removed_while_snapshots_are_written_never_leaves_a_torn_one(
    make_store, tmp_path
):
    """The directory deleted over and over while snapshots are written: each attempt either
    commits a whole snapshot or fails (one exception naming it); every snapshot listed
    afterwards loads with the rows of its step, and the store keeps stepping."""
    snaps = tmp_path / "snaps"
    store = make_store(num_rows=N, dim=D, num_shards=2, seed=41, snapshot_dir=str(snaps))
    f, ids, _ = batch(41)
    obj = SampledSoftmax(num_negatives=K)
    stop = threading.Event()

    pauses = itertools.cycle([0.002] * 3 + [0.05])

    def remove() -> None:  # bursts of deletions, and pauses long enough to commit in
        while not stop.is_set():
            shutil.rmtree(snaps, ignore_errors=True)
            time.sleep(next(pauses))

    remover = threading.Thread(target=remove)
    remover.start()
    outcomes, rows_at = [], {}
    try:
        for step in range(1, 13):
            store.step(f, ids, obj)
            rows_at[step] = all_rows(store)
            try:
                store.snapshot()
                outcomes.append("committed")
            except (OSError, ValueError) as err:
                assert str(err), "a failure names what failed"
                outcomes.append("failed")
    finally:
        stop.set()
        remover.join()
    assert len(outcomes) == 12
    for m in snapshot_module.list_snapshots(str(snaps)):  # whatever survived the deletions
        other = make_store(num_rows=N, dim=D, num_shards=1, seed=1)
        other.load_snapshot(m.uri)
        close(all_rows(other), rows_at[m.step], tol=0)
    store.step(f, ids, obj)
    store.snapshot()  # the directory left alone: snapshots work again
    assert snapshot_module.list_snapshots(str(snaps))[0].step == 13
