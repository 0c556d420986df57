"""The kNN query service over a running feature store.

    python -m knn_service.serve --store-name NAME [--namespace npid]
        [--train-data DIR_OR_URL] [--checkpoint PATH] [--host 127.0.0.1] [--port 8000]
        [--refresh-seconds N] [--kind flat|ivf] [--max-k 1000] [--max-queries 1024]
        [--max-body-bytes 8388608]

The process attaches to the store's shard actors over Ray (``RAY_ADDRESS`` or the local
cluster), builds a FAISS/torch index from ``store.export()``, and serves the HTTP API of
:mod:`knn_service.http_app` from this process (aiohttp), rebuilding the index on ``POST /refresh``
and every ``--refresh-seconds``. ``--train-data`` supplies neighbour labels, keys and source
paths (and enables ``/classify``); ``--checkpoint`` (exported encoder, training checkpoint or
run directory) enables image queries. Query vectors are L2-normalized before the search; the
similarity is the inner product with the bank row (the cosine, as the store's momentum update
keeps rows unit length). It binds 127.0.0.1 unless ``--host`` says otherwise; with
``NPID_API_TOKEN`` set every route but ``/healthz`` needs ``Authorization: Bearer <token>``.

Bad arguments (no such store, unreadable data or checkpoint, mismatched dims or row counts,
a port in use) print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from typing import TYPE_CHECKING, Any

from knn_service.cli import (
    DEFAULT_MAX_BODY_BYTES,
    OneLineParser,
    UsageError,
    non_negative_float,
    port_number,
    positive_int,
)

if TYPE_CHECKING:  # the heavy modules are imported when serving starts: --help stays fast
    from knn_service.http_app import AppSettings
    from knn_service.query_engine import KnnService

logger = logging.getLogger("knn_service.serve")

PROG = "python -m knn_service.serve"
TOKEN_ENV = "NPID_API_TOKEN"
DEFAULT_NAMESPACE = "npid"  # featurestore.store.DEFAULT_NAMESPACE (not imported: keeps --help fast)


def parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    p = OneLineParser(
        prog=PROG,
        description="HTTP kNN queries over the feature store's bank.",
        epilog=f"Authentication: set {TOKEN_ENV} to require 'Authorization: Bearer <token>' "
        "on every route but /healthz (unset or empty: no token).",
    )
    p.add_argument("--store-name", required=True, help="name of the running feature store")
    p.add_argument("--namespace", default=DEFAULT_NAMESPACE, help="Ray namespace of the store")
    p.add_argument("--train-data", help="training shards (labels, keys; enables /classify)")
    p.add_argument(
        "--checkpoint", help="exported encoder, training checkpoint or run dir (image queries)"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    p.add_argument("--port", type=port_number, default=8000, help="port (0: any free port)")
    p.add_argument(
        "--refresh-seconds",
        type=non_negative_float,
        default=0.0,
        help="rebuild the index this often (0: only on POST /refresh)",
    )
    p.add_argument("--kind", choices=("flat", "ivf"), default="flat", help="index kind")
    p.add_argument("--max-k", type=positive_int, default=1000, help="largest k per query")
    p.add_argument("--max-queries", type=positive_int, default=1024, help="queries per request")
    p.add_argument(
        "--max-body-bytes", type=positive_int, default=DEFAULT_MAX_BODY_BYTES, help="body limit"
    )
    p.add_argument("--device", default="cpu", help="device of the image encoder")
    p.add_argument("--log-level", default="INFO", help="logging level")
    return p


def settings_from_args(args: argparse.Namespace) -> AppSettings:
    """HTTP settings; the API token comes from ``NPID_API_TOKEN`` (unset or empty: off)."""
    from knn_service.http_app import AppSettings

    return AppSettings(
        max_body_bytes=args.max_body_bytes,
        refresh_seconds=args.refresh_seconds,
        api_token=os.environ.get(TOKEN_ENV) or None,
    )


def build_service(args: argparse.Namespace) -> tuple[KnnService, Any]:
    """Attach to the store, load labels and encoder, build the first index.

    Returns:
        ``(service, store)``.

    Raises:
        UsageError: a bad input (message names it).
    """
    from knn_service.encoders import load_encoder_from
    from knn_service.query_engine import KnnService
    from knn_service.train_labels import TrainLabels
    from trainer.api import dataset_location

    train = None
    train_data = args.train_data
    if train_data is not None:
        try:
            train_data = dataset_location(train_data, "train")  # also the built-in "digits"
            train = TrainLabels.load(train_data)
        except (OSError, ValueError) as exc:
            raise UsageError(f"--train-data {args.train_data}: {exc}") from None
    encoder = None
    if args.checkpoint is not None:
        try:
            encoder = load_encoder_from(args.checkpoint, train_data, device=args.device)
        except (OSError, ValueError, RuntimeError) as exc:
            raise UsageError(f"--checkpoint {args.checkpoint}: {exc}") from None

    from featurestore.store import ShardedStore  # imports Ray

    try:
        store = ShardedStore.attach(args.store_name, namespace=args.namespace)
    except (LookupError, ValueError) as exc:
        raise UsageError(f"--store-name {args.store_name}: {exc}") from None
    if encoder is not None and encoder.dim != store.dim:
        raise UsageError(
            f"--checkpoint {args.checkpoint} embeds in {encoder.dim} dims but store "
            f"{args.store_name!r} has dim {store.dim}"
        )
    if train is not None and train.num_instances != store.num_rows:
        raise UsageError(
            f"--train-data {args.train_data} has {train.num_instances} instances but store "
            f"{args.store_name!r} has {store.num_rows} rows"
        )
    service = KnnService(
        store.export,
        dim=store.dim,
        kind=args.kind,
        train=train,
        encoder=encoder,
        max_k=args.max_k,
        max_queries=args.max_queries,
    )
    try:
        service.refresh()
    except ValueError as exc:
        raise UsageError(f"--store-name {args.store_name}: {exc}") from None
    return service, store


async def serve(service: KnnService, settings: AppSettings, host: str, port: int) -> None:
    """Serve until SIGINT/SIGTERM."""
    from knn_service.http_app import build_app, start_site

    app = build_app(service, settings)
    runner, bound = await start_site(app, host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    logger.info(
        "kNN service on http://%s:%d (%d rows, dim %d, %s index, labels %s, images %s, token %s)",
        host, bound, service.state.rows, service.dim, service.kind,
        "on" if service.train is not None else "off",
        "on" if service.encoder is not None else "off",
        "on" if settings.api_token else "off",
    )  # fmt: skip
    try:
        await stop.wait()
    finally:
        logger.info("kNN service stopping")
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    settings = settings_from_args(args)
    if settings.api_token is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning(
            "serving on %s without %s: anyone who can reach it can query", args.host, TOKEN_ENV
        )
    try:
        service, _store = build_service(args)
    except UsageError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(service, settings, args.host, args.port))
    except OSError as exc:  # e.g. the port is taken
        print(f"{PROG}: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
