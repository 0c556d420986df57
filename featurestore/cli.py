"""``python -m featurestore {start,status,snapshot,stop} --name NAME``: the feature store
as a command-line service on the current Ray cluster.

    python -m featurestore start --name bank --rows 1281167 [--dim 128] [--shards 4]
        [--gpus-per-shard 1] [--dtype bfloat16] [--snapshot-dir s3://b/snaps]
        [--snapshot-every-steps 1000]
    python -m featurestore start --name bank --restore s3://b/snaps [--shards 8]
    python -m featurestore status --name bank
    python -m featurestore snapshot --name bank [--to URI]
    python -m featurestore stop --name bank

The cluster is the one ``RAY_ADDRESS`` names (with the head's ``RAY_AUTH_MODE=token
RAY_AUTH_TOKEN=…`` when it uses token authentication), or the running local cluster of
``ray start --head``; these commands never start a Ray of their own, since a store in a Ray
that ends with the command would be gone with it. The store's shard actors are detached:
they run until ``stop``. A training run uses one with ``trainer.run --store-name NAME`` and
leaves it running; ``knn_service.serve --store-name NAME`` serves it.

Every command prints one JSON object on stdout. Bad input (no cluster, a token missing, no
such store, a name taken, an unreadable snapshot) is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from featurestore.argtypes import DefaultsHelpFormatter, OneLineParser

PROG = "python -m featurestore"
DEFAULT_NAMESPACE = "npid"  # featurestore.store_transport.DEFAULT_NAMESPACE (no Ray import)
DTYPES = ("float32", "bfloat16", "float16")


class UsageError(ValueError):
    """A bad input; the message names it."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}")
    return value


def parser() -> argparse.ArgumentParser:
    """The command-line parser (``--help`` imports neither torch nor Ray)."""
    p = OneLineParser(
        prog=PROG,
        description="Start, inspect, snapshot and stop a named feature store on the current "
        "Ray cluster (RAY_ADDRESS, or the local `ray start --head` cluster).",
        epilog="A cluster with token authentication (a plain `ray start --head`) needs the "
        "head's RAY_AUTH_MODE=token RAY_AUTH_TOKEN=<token> in every client's environment.",
        formatter_class=DefaultsHelpFormatter,
    )
    commands = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name, help=help_text, description=help_text,
            formatter_class=DefaultsHelpFormatter,
        )  # fmt: skip
        sub.error = p.error  # type: ignore[method-assign]  # one line, exit 2
        sub.add_argument("--name", required=True, help="the store's name")
        sub.add_argument("--namespace", default=DEFAULT_NAMESPACE, help="Ray namespace")
        return sub

    start = command("start", "start a named, detached store")
    start.add_argument("--rows", type=_positive_int, help="rows N (one per training image)")
    start.add_argument(
        "--restore", metavar="URI", help="start from this snapshot (or the newest in a dir)"
    )
    start.add_argument("--dim", type=_positive_int, default=128, help="row dimension d")
    start.add_argument(
        "--shards", type=_positive_int, default=None, help="shard actors (default 1, or the "
        "snapshot's with --restore)"
    )  # fmt: skip
    start.add_argument(
        "--gpus-per-shard", type=_non_negative, default=0.0, help="GPUs per shard (0: CPU)"
    )
    start.add_argument("--dtype", choices=DTYPES, default="float32", help="row storage")
    start.add_argument("--momentum", type=float, default=0.5, help="memory update momentum m")
    start.add_argument("--seed", type=int, default=0, help="seed of the initial rows")
    start.add_argument("--snapshot-dir", help="where snapshots go and restarted shards reload from")
    start.add_argument(
        "--snapshot-every-steps", type=int, default=0, help="automatic snapshots (0: never)"
    )
    start.add_argument(
        "--snapshot-every-seconds", type=_non_negative, default=0.0,
        help="automatic snapshots (0: never)",
    )  # fmt: skip
    command("status", "shards, rows, steps, last snapshot and memory of a store")
    snap = command("snapshot", "write a snapshot now; prints its URI")
    snap.add_argument("--to", metavar="URI", help="where (default: the store's --snapshot-dir)")
    command("stop", "remove the store's actors (its snapshots stay)")
    return p


def _connect() -> None:
    from featurestore.ray_connect import RayConnectError, connect

    try:
        connect(start_local=False, log_to_driver=False, logging_level=logging.WARNING)
    except RayConnectError as exc:
        raise UsageError(str(exc)) from None


def _attach(args: argparse.Namespace):
    from featurestore.store import ShardedStore

    try:
        return ShardedStore.attach(args.name, namespace=args.namespace)
    except (LookupError, ValueError) as exc:
        raise UsageError(f"--name {args.name}: {exc}") from None


def _start(args: argparse.Namespace) -> dict[str, Any]:
    from featurestore.store import ShardedStore

    options = {
        "name": args.name,
        "namespace": args.namespace,
        "num_gpus_per_shard": args.gpus_per_shard,
        "dtype": args.dtype,
        "snapshot_dir": args.snapshot_dir,
        "snapshot_every_steps": args.snapshot_every_steps,
        "snapshot_every_seconds": args.snapshot_every_seconds,
    }
    if (args.rows is None) == (args.restore is None):
        raise UsageError("start needs exactly one of --rows N (a new store) or --restore URI")
    from featurestore.store_transport import lookup

    if lookup(args.name, args.namespace, 0) is not None:
        raise UsageError(
            f"--name {args.name}: a store of that name is running (namespace "
            f"{args.namespace}); use it (trainer.run --store-name {args.name}) or stop it "
            f"first ({PROG} stop --name {args.name})"
        )
    try:
        if args.restore is not None:
            store = ShardedStore.restore(args.restore, args.shards, **options)
        else:
            store = ShardedStore(
                num_rows=args.rows, dim=args.dim, num_shards=args.shards or 1,
                momentum=args.momentum, seed=args.seed, **options,
            )  # fmt: skip
    except (OSError, ValueError, TypeError) as exc:
        flag = f"--restore {args.restore}" if args.restore else f"--name {args.name}"
        raise UsageError(f"{flag}: {exc}") from None
    return {"started": args.name, **_status(store)}


def _status(store) -> dict[str, Any]:
    infos = store.shard_info()
    step, z = store.state()
    shards = []
    for info in infos:
        shards.append(
            {
                "shard": info["shard"],
                "rows": info["rows"],
                "device": info["device"],
                "applied_steps": info["applied_steps"],
                "last_snapshot_step": info["last_snapshot_step"],
                "snapshot_failures": info["snapshot_failures"],
                "memory": info.get("memory"),
            }
        )
    config = infos[0]["config"]
    return {
        "name": store.name,
        "namespace": store.namespace,
        "num_rows": store.num_rows,
        "dim": store.dim,
        "num_shards": len(infos),
        "dtype": str(config.dtype),
        "steps": step,
        "z": z,
        "last_snapshot_step": min(s["last_snapshot_step"] for s in shards),
        "snapshot_dir": config.snapshot_dir,
        "rows_bytes": sum((s["memory"] or {}).get("rows_bytes", 0) for s in shards),
        "shards": shards,
    }


def _snapshot(args: argparse.Namespace) -> dict[str, Any]:
    store = _attach(args)
    try:
        uri = store.snapshot(args.to)
    except (OSError, ValueError) as exc:
        raise UsageError(f"snapshot of {args.name}: {exc}") from None
    return {"name": args.name, "snapshot": uri, "step": store.step_count}


def _stop(args: argparse.Namespace) -> dict[str, Any]:
    store = _attach(args)
    store.shutdown()
    return {"stopped": args.name}


def main(argv: list[str] | None = None) -> int:
    """Entry point; prints one JSON object, returns the exit status."""
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        _connect()
        if args.command == "start":
            record = _start(args)
        elif args.command == "status":
            record = _status(_attach(args))
        elif args.command == "snapshot":
            record = _snapshot(args)
        else:
            record = _stop(args)
    except UsageError as exc:
        print(f"{PROG} {args.command}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(record, indent=2, default=str))
    return 0


__all__ = ["main", "parser"]
