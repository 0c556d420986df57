"""ShardedStore on a local Ray instance against the in-process MemoryBank."""

from __future__ import annotations

import itertools
import math
import pickle
import threading

import numpy as np
import pyarrow as pa
import pytest
import torch
from reference import bad_step_cases, unit

from featurestore import NCE, MemoryBank, SampledSoftmax, ShardedStore, Softmax
from featurestore import metrics as store_metrics_module
from featurestore.arrow_io import from_record_batch
from featurestore.bank_shard import BankShard, initial_rows
from featurestore.noise import NoiseSpec, local_noise, step_seed
from featurestore.shard_protocol import StepRequest
from featurestore.statistics import merge
from featurestore.store import shard_bounds

pytestmark = pytest.mark.ray

N, D, B, K = 211, 16, 12, 40  # N is divisible by neither 2 nor 3


def close(a, b, tol=2e-5):
    torch.testing.assert_close(a.float().cpu(), b.float().cpu(), rtol=tol, atol=tol)


def batch(seed: int, b: int = B, n: int = N, shared: bool = False):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randperm(n, generator=g)[:b]
    noise = torch.randint(0, n, (K,) if shared else (b, K), generator=g)
    return unit(b, D, seed + 100), ids, noise


def all_rows(store) -> torch.Tensor:
    return store.get(torch.arange(store.num_rows))


@pytest.mark.parametrize(
    "num_rows, num_shards", [(10, 3), (211, 2), (211, 3), (7, 7), (5, 1), (1_281_167, 2)]
)
def test_shard_bounds_like_array_split(num_rows, num_shards):
    splits = np.array_split(np.arange(num_rows), num_shards)
    expect = [0, *np.cumsum([len(s) for s in splits]).tolist()]
    assert shard_bounds(num_rows, num_shards) == expect


# The sequence every store runs in lockstep with a MemoryBank: (objective, shared noise).
STEPS = [
    (NCE(num_negatives=K), False),  # first NCE step: Z estimated from this step's noise
    (NCE(num_negatives=K, prox_lambda=0.3, shared_noise=True), True),  # stored Z reused
    (SampledSoftmax(num_negatives=K, temperature=0.1, prox_lambda=0.2), False),
    (SampledSoftmax(num_negatives=K, shared_noise=True), True),
    (Softmax(temperature=0.1, prox_lambda=0.5), False),
    (Softmax(), False),
    (NCE(num_negatives=K, z=1234.5), False),  # fixed Z from the objective
    (NCE(num_negatives=K, temperature=0.2, prox_lambda=0.1), False),
]


@pytest.mark.parametrize("num_shards", [1, 3])
def test_nce_z_ema_through_the_store_equals_memory_bank(make_store, num_shards):
    """Z re-estimated every step (z_momentum): the store's Z follows the MemoryBank's, the
    observation travelling to shard 0 with the client's next step."""
    store = make_store(num_rows=N, dim=D, num_shards=num_shards, seed=6)
    bank = MemoryBank(N, D, seed=6)
    objective = NCE(num_negatives=K, z_momentum=0.8)
    for i in range(5):
        feats, ids, noise = batch(60 + i)
        got = store.step(feats, ids, objective, noise_ids=noise)
        want = bank.step(feats, ids, objective, noise_ids=noise)
        assert got.z == pytest.approx(want.z, rel=1e-5)
        close(got.loss, want.loss)
        close(got.grad, want.grad, tol=1e-5)
    assert bank.z != pytest.approx(got.z, rel=1e-3)  # Z moved after the last step ...
    feats, ids, noise = batch(70)
    got = store.step(feats, ids, objective, noise_ids=noise)  # ... and the store follows
    assert got.z == pytest.approx(bank.z, rel=1e-5)


@pytest.mark.parametrize("num_shards", [1, 2, 3])
def test_sharded_step_equals_memory_bank_for_every_objective(make_store, num_shards):
    store = make_store(num_rows=N, dim=D, num_shards=num_shards, seed=3, memory_budget=4096)
    bank = MemoryBank(N, D, seed=3, memory_budget=4096)
    assert store.bounds == shard_bounds(N, num_shards)
    close(all_rows(store), bank.rows)  # initial rows do not depend on S
    for i, (objective, shared) in enumerate(STEPS):
        feats, ids, noise = batch(i, shared=shared)
        if i == 2:
            ids[3] = ids[7]  # a repeated id: updated once, with its last feature
        noise_ids = noise if objective.sampled else None
        got = store.step(feats, ids, objective, noise_ids=noise_ids)
        want = bank.step(feats, ids, objective, noise_ids=noise_ids)
        close(got.loss, want.loss)
        close(got.grad, want.grad, tol=1e-5)
        close(got.sample_loss, want.sample_loss)
        if want.z is None:
            assert got.z is None
        else:
            assert got.z == pytest.approx(want.z, rel=1e-6)
        close(all_rows(store), bank.rows, tol=1e-6)
    assert store.z == pytest.approx(bank.z, rel=1e-6)
    assert store.step_count == bank.step_count == len(STEPS)

    # Drawn noise: step t uses step_seed(seed, t) split over the shards by local_noise.
    feats, ids, _ = batch(99)
    objective = SampledSoftmax(num_negatives=K)
    for seed in (None, 77):
        rows = bank.rows.clone()
        spec_seed = step_seed(3, store.step_count) if seed is None else seed
        got = store.step(feats, ids, objective, seed=seed)
        want = in_process_step(rows, store.bounds, feats, ids, objective, spec_seed)
        close(got.grad, want, tol=1e-5)
        if num_shards == 1:  # one shard draws exactly the MemoryBank's noise
            close(got.grad, bank.step(feats, ids, objective, seed=seed).grad, tol=1e-5)
        else:
            bank.update(ids, feats)
            bank.step_count += 1
    close(all_rows(store), bank.rows, tol=1e-6)


def test_steps_in_flight_equal_sequential_steps(make_store):
    """step_async: several steps of one client in flight at once apply in order, each with
    its own step number (seed), exactly like the same steps taken one at a time."""
    store = make_store(num_rows=N, dim=D, num_shards=2, seed=4)
    bank = MemoryBank(N, D, seed=4)
    objective = SampledSoftmax(num_negatives=K)
    batches = [batch(40 + i) for i in range(3)]
    pending = [store.step_async(f, ids, objective, noise_ids=noise) for f, ids, noise in batches]
    pending.append(store.step_async(*batches[0][:2], objective))  # drawn noise: step 3's seed
    for (f, ids, noise), p in zip(batches, pending):
        want = bank.step(f, ids, objective, noise_ids=noise)
        close(p.result().grad, want.grad, tol=1e-5)
    rows = bank.rows.clone()
    want = in_process_step(rows, store.bounds, *batches[0][:2], objective, step_seed(4, 3))
    close(pending[3].result().grad, want, tol=1e-5)
    bank.update(batches[0][1], batches[0][0])
    close(all_rows(store), bank.rows, tol=1e-6)
    assert store.step_count == 4
    with pytest.raises(ValueError, match="out of range"):
        store.step_async(batches[0][0], batches[0][1] + N, objective)


@pytest.mark.parametrize("b", [700, 2200])  # 350 KiB in inline pieces; 1.1 MiB shared
def test_big_batches_cross_the_wire_in_pieces(make_store, b):
    """Features and replies above Ray's inline limit (wire.py) give MemoryBank's result."""
    n, d = 2500, 128
    store = make_store(num_rows=n, dim=d, num_shards=2, seed=8)
    bank = MemoryBank(n, d, seed=8)
    g = torch.Generator().manual_seed(8)
    ids = torch.randperm(n, generator=g)[:b]
    noise = torch.randint(0, n, (b, K), generator=g)
    for i, objective in enumerate([Softmax(), NCE(num_negatives=K, prox_lambda=0.1)]):
        feats = unit(b, d, 80 + i)
        noise_ids = noise if objective.sampled else None
        got = store.step(feats, ids, objective, noise_ids=noise_ids)
        want = bank.step(feats, ids, objective, noise_ids=noise_ids)
        close(got.loss, want.loss)
        close(got.grad, want.grad, tol=1e-5)
    close(all_rows(store), bank.rows, tol=1e-6)


def test_attached_clients_draw_their_own_noise(make_store):
    """Two clients at the same step number do not draw the same noise ids."""
    store = make_store(num_rows=N, dim=D, num_shards=2, seed=6)
    other = ShardedStore.attach(store.name, namespace="npid-tests")
    assert step_seed(6, 0) == step_seed(6, 0, 0) != step_seed(6, 0, other._steps.client)
    f, ids, _ = batch(6)
    objective = SampledSoftmax(num_negatives=K)
    rows = all_rows(store)
    a = store.step_async(f, ids, objective)  # both number this step 0
    b = other.step_async(f, ids, objective)
    close(a.result().grad, in_process_step(rows, store.bounds, f, ids, objective, step_seed(6, 0)))
    assert not torch.allclose(a.result().grad, b.result().grad)
    assert store.step_count == 1 and store.state()[0] == 2  # this client saw one step


def in_process_step(rows, bounds, feats, ids, objective, seed):
    """The store protocol run in this process with drawn noise: the expected ``grad``."""
    spec = NoiseSpec(objective.num_negatives, objective.shared_noise, seed)
    parts = []
    for s, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        noise = local_noise(spec, feats.shape[0], bounds, s)
        parts.append(
            BankShard(rows[lo:hi], lo, 0.5).statistics(feats, ids, objective, noise, None, N)
        )
    return merge(parts, feats, objective)[1]


def test_get_set_update_sample_and_export(make_store):
    store = make_store(num_rows=N, dim=D, num_shards=3, seed=7, momentum=0.25)
    bank = MemoryBank(N, D, seed=7, momentum=0.25)
    edges = torch.tensor(store.bounds[1:-1])
    ids = torch.cat([edges - 1, edges, torch.tensor([0, N - 1, 5])])  # across every boundary
    close(store.get(ids), bank.get(ids))
    assert store.get(torch.tensor([], dtype=torch.int64)).shape == (0, D)
    rows = unit(ids.numel(), D, 1)
    store.set(ids, rows)
    bank.set(ids, rows)
    dup = torch.tensor([3, 150, 3, 80])  # repeated id: last one wins
    feats = unit(4, D, 2)
    store.update(dup, feats)
    bank.update(dup, feats)
    close(all_rows(store), bank.rows)

    sample_ids, sample_rows = store.sample(20_000, seed=4)
    assert sample_ids.shape == (20_000,) and sample_rows.shape == (20_000, D)
    close(sample_rows, bank.get(sample_ids))
    counts = torch.bincount(sample_ids, minlength=N).double()
    assert int(sample_ids.min()) >= 0 and int(sample_ids.max()) < N
    chi2 = float(((counts - counts.mean()) ** 2 / counts.mean()).sum())
    assert chi2 < N + 6 * math.sqrt(2 * N)  # uniform: chi2 ~ N - 1 ± sqrt(2N)
    assert not torch.equal(store.sample(50)[0], store.sample(50)[0])  # seed=None: fresh draws

    batches = list(store.export(batch_rows=50))
    assert all(isinstance(b, pa.RecordBatch) and b.num_rows <= 50 for b in batches)
    ids_out = torch.cat([from_record_batch(b)[0] for b in batches])
    rows_out = torch.cat([from_record_batch(b)[1] for b in batches])
    assert torch.equal(ids_out, torch.arange(N))
    close(rows_out, bank.rows, tol=0)
    table = pa.Table.from_batches(batches)
    assert table.schema.field("vector").type == pa.list_(pa.float32(), D)


def test_low_precision_store_matches_memory_bank(make_store):
    store = make_store(num_rows=N, dim=D, num_shards=2, seed=9, dtype="bfloat16")
    bank = MemoryBank(N, D, seed=9, dtype="bfloat16")
    feats, ids, noise = batch(9)
    got = store.step(feats, ids, NCE(num_negatives=K), noise_ids=noise)
    want = bank.step(feats, ids, NCE(num_negatives=K), noise_ids=noise)
    close(got.grad, want.grad)
    close(all_rows(store), bank.get(torch.arange(N)), tol=0)


def test_attach_by_name_pickle_and_name_clash(make_store, ray_cluster):
    store = make_store(num_rows=N, dim=D, num_shards=2, seed=11)
    feats, ids, noise = batch(11)
    store.step(feats, ids, NCE(num_negatives=K), noise_ids=noise)
    other = ShardedStore.attach(store.name, namespace="npid-tests")
    assert (other.num_rows, other.dim, other.num_shards) == (N, D, 2)
    assert other.z == store.z and other.step_count == 1
    close(all_rows(other), all_rows(store), tol=0)
    clone = pickle.loads(pickle.dumps(store))  # a pickled store attaches by name
    assert clone.name == store.name and clone.step_count == 1

    @ray_cluster.remote(num_cpus=0)
    def z_in_task(handle):
        return handle.z, handle.step_count

    assert ray_cluster.get(z_in_task.remote(store)) == (store.z, 1)
    with pytest.raises(ValueError, match=f"named '{store.name}' already exists"):
        ShardedStore(num_rows=N, dim=D, name=store.name, namespace="npid-tests")
    same = ShardedStore(
        num_rows=N, dim=D, num_shards=2, name=store.name, namespace="npid-tests", exist_ok=True
    )
    assert same.z == store.z
    with pytest.raises(ValueError, match="num_rows"):
        ShardedStore(num_rows=N + 1, dim=D, name=store.name, namespace="npid-tests", exist_ok=True)
    with pytest.raises(LookupError, match="no-such-store"):
        ShardedStore.attach("no-such-store", namespace="npid-tests")
    store.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        store.get(torch.tensor([0]))
    with pytest.raises(LookupError, match=store.name):
        ShardedStore.attach(store.name, namespace="npid-tests")


def test_concurrent_clients_lose_no_update(make_store, ray_cluster):
    store = make_store(num_rows=N, dim=D, num_shards=2, seed=13, momentum=0.5)
    rounds, per_client = 6, 10
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(0))
    groups = [perm[i * per_client : (i + 1) * per_client] for i in range(4)]  # disjoint ids
    feats = [unit(rounds * per_client, D, 50 + i).view(rounds, per_client, D) for i in range(4)]

    def client_steps(name, ids, feats, rounds):  # local: Ray pickles it by value
        client = ShardedStore.attach(name, namespace="npid-tests")
        return [
            float(client.step(feats[r], ids, SampledSoftmax(num_negatives=K)).loss)
            for r in range(rounds)
        ]

    remote_steps = ray_cluster.remote(num_cpus=0)(client_steps)
    refs = [remote_steps.remote(store.name, groups[i], feats[i], rounds) for i in (0, 1)]
    errors = []

    def run(i):
        try:
            client_steps(store.name, groups[i], feats[i], rounds)
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in (2, 3)]
    for t in threads:
        t.start()
    remote_losses = ray_cluster.get(refs)
    for t in threads:
        t.join()
    assert not errors
    assert all(len(losses) == rounds for losses in remote_losses)
    assert store.state()[0] == 4 * rounds  # every step got its own number (seed)
    sequential = MemoryBank(N, D, seed=13, momentum=0.5)
    for i in range(4):
        for r in range(rounds):
            sequential.update(groups[i], feats[i][r])
    close(all_rows(store), sequential.rows, tol=1e-6)


def _bad_step_cases():
    return bad_step_cases(*batch(12), N, K)


def test_bad_input_raises_value_error_and_leaves_store_unchanged(make_store):
    store = make_store(num_rows=N, dim=D, num_shards=2, seed=12)
    before = all_rows(store)
    for message, kwargs in _bad_step_cases():
        with pytest.raises(ValueError, match=message):
            MemoryBank(N, D, seed=12).step(**kwargs)  # same message as the in-process bank
        with pytest.raises(ValueError, match=message):
            store.step(**kwargs)
    with pytest.raises(ValueError, match="out of range"):
        store.get(torch.tensor([N]))
    with pytest.raises(ValueError, match="rows"):
        store.set(torch.tensor([1]), torch.ones(2, D))
    with pytest.raises(ValueError, match="non-finite"):
        store.update(torch.tensor([1]), torch.full((1, D), math.nan))
    with pytest.raises(ValueError, match="n must be"):
        store.sample(-1)
    with pytest.raises(ValueError, match="batch_rows"):
        next(store.export(batch_rows=0))
    with pytest.raises(ValueError, match="snapshot_dir"):
        store.snapshot()
    assert torch.equal(all_rows(store), before)
    assert store.z is None and store.step_count == 0
    # an error raised inside a shard comes back as a ValueError with the shard's message
    f, ids, _ = batch(12)
    with pytest.raises(ValueError, match=r"unknown objective kind 'nope'.*shard 1 of store"):
        store._group.call("register_objective", {1: ("k", {"kind": "nope"})})
    # a step names its objective by the key the client registered once per shard
    with pytest.raises(LookupError, match=r"unknown objective 'unsent'.*shard 1 of store"):
        request = StepRequest(2, "r", ids, "unsent", None, None, 0, None)
        store._group.call("step", {1: (request, f)})
    assert torch.equal(all_rows(store), before)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_rows=0), "num_rows"),
        (dict(num_rows=10, dim=0), "dim"),
        (dict(num_rows=10, momentum=2.0), "momentum"),
        (dict(num_rows=10, num_shards=11), "num_shards"),
        (dict(num_rows=10, num_shards=0), "num_shards"),
        (dict(num_rows=10, dtype="int8"), "dtype"),
        (dict(num_rows=10, num_gpus_per_shard=-1), "num_gpus_per_shard"),
        (dict(num_rows=10, num_gpus_per_shard=1.5), "num_gpus_per_shard"),
        (dict(num_rows=10, num_cpus_per_shard=-0.5), "num_cpus_per_shard"),
        (dict(num_rows=10, name=""), "name"),
        (dict(num_rows=10, snapshot_every_steps=5), "snapshot_dir"),
        (dict(num_rows=10, snapshot_dir="memory://bank"), "memory"),
        (dict(num_rows=10, keep_snapshots=0), "keep_snapshots"),
        (dict(num_rows=10, max_retries=-1), "max_retries"),
    ],
)
def test_bad_constructor_arguments(ray_cluster, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ShardedStore(namespace="npid-tests", **kwargs)


def test_initial_rows_options(make_store):
    store = make_store(num_rows=N, dim=D, num_shards=2, seed=1, normalize_init=True)
    close(all_rows(store), initial_rows(1, 0, N, D, normalize=True), tol=0)
    info = store.shard_info()
    assert [i["rows"] for i in info] == [106, 105]
    assert all(i["device"] == "cpu" for i in info)


def test_a_store_from_its_config_is_the_store_from_the_same_arguments(make_store):
    import dataclasses
    import uuid

    from featurestore import ShardedStore
    from featurestore.shard_protocol import StoreConfig

    by_args = make_store(num_rows=N, dim=D, num_shards=2, seed=3, momentum=0.25)
    config = StoreConfig(
        num_rows=N,
        dim=D,
        num_shards=2,
        seed=3,
        momentum=0.25,
        name=f"test-store-{uuid.uuid4().hex[:10]}",
        namespace="npid-tests",
    )
    by_config = ShardedStore.from_config(config)
    make_store.track(by_config)
    assert torch.equal(all_rows(by_config), all_rows(by_args))
    ours = dataclasses.replace(by_config.config, store_id="-")
    assert ours == dataclasses.replace(config, store_id="-")
    assert by_config.config.store_id != config.store_id  # a new store, a new id


def test_metric_definitions_and_recording(ray_cluster):
    defs = store_metrics_module.DEFINITIONS
    assert defs == {
        "npid_store_requests_total": ("counter", ("op", "shard")),
        "npid_store_request_seconds": ("histogram", ("op",)),
        "npid_store_rows": ("gauge", ("shard",)),
        "npid_store_snapshot_seconds": ("histogram", ()),
        "npid_store_restarts_total": ("counter", ("shard",)),
        "npid_store_snapshot_failures_total": ("counter", ()),
        "npid_store_snapshot_retries_total": ("counter", ()),
    }
    m = store_metrics_module.store_metrics()
    assert m is store_metrics_module.store_metrics()
    m.count_request("step", 0)
    m.observe_request("step", 0.01)
    m.set_rows(0, 10)
    m.observe_snapshot(1.0)
    m.count_restart(0)
    m.count_snapshot_failure()
    assert not store_metrics_module._warned
