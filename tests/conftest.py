"""Shared fixtures: a local Ray instance on 127.0.0.1 and the opt-in CIFAR-10 data.

Ray stays on loopback (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``) with 2 CPUs; one instance
serves the whole session. Tests that need Ray take the ``ray_cluster`` fixture.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

REPO_ROOT = Path(__file__).resolve().parent.parent
CIFAR_ARCHIVE = REPO_ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray instance (2 CPUs, loopback) for the whole test session."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            namespace="npid-tests",
        )
    yield ray
    ray.shutdown()


def cifar_enabled() -> bool:
    """Opt-in CIFAR-10 tests: NPID_CIFAR_TESTS=1 and the archive beside the repo."""
    return os.environ.get("NPID_CIFAR_TESTS") == "1" and CIFAR_ARCHIVE.is_file()


def pytest_collection_modifyitems(config, items):
    if cifar_enabled():
        return
    skip = pytest.mark.skip(reason="opt-in: set NPID_CIFAR_TESTS=1 with ../shared/data present")
    for item in items:
        if item.get_closest_marker("cifar") is not None:
            item.add_marker(skip)


@contextlib.contextmanager
def environ(env: dict[str, str]) -> Iterator[None]:
    """``os.environ`` updated with ``env`` inside the block, restored after it."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session")
def s3_server():
    """An S3-compatible server (moto's) on 127.0.0.1 with bucket ``npid``; the AWS variables
    that point boto3, s3fs and pyarrow at it are set for the session (and inherited by the
    Ray instances and subprocesses started after this fixture).

    Yields the environment variables set.
    """
    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "npid-test",
        "AWS_SECRET_ACCESS_KEY": "npid-test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
    }
    import fsspec

    try:
        with environ(env):
            fsspec.filesystem("s3", skip_instance_cache=True).mkdir("npid")
            yield env
    finally:
        server.stop()


@pytest.fixture(scope="session")
def gcs_server():
    """A Google Cloud Storage-compatible server (gcp-storage-emulator, in memory) on
    127.0.0.1 with bucket ``npid``; ``STORAGE_EMULATOR_HOST`` points gcsfs at it for the
    session (inherited by subprocesses started after this fixture).

    Yields the environment variables set.
    """
    pytest.importorskip("gcsfs")
    emulator = pytest.importorskip("gcp_storage_emulator.server")
    import socket

    with socket.socket() as probe:  # a free port (the emulator does not take port 0)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = emulator.create_server("127.0.0.1", port, in_memory=True, default_bucket="npid")
    server.start()
    env = {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}"}
    try:
        with environ(env):
            yield env
    finally:
        server.stop()


@pytest.fixture
def make_store(ray_cluster):
    """Factory for ``ShardedStore`` objects with unique names; all shut down after the test.

    ``make_store(num_rows=…, …)`` creates one (namespace "npid-tests" unless given);
    ``make_store.track(store)`` registers a store made otherwise (``restore``, ``attach``).
    """
    import uuid

    from featurestore import ShardedStore

    stores = []

    def make(**kwargs):
        kwargs.setdefault("name", f"test-store-{uuid.uuid4().hex[:10]}")
        kwargs.setdefault("namespace", "npid-tests")
        store = ShardedStore(**kwargs)
        stores.append(store)
        return store

    make.track = stores.append
    yield make
    for store in stores:
        store.shutdown()
