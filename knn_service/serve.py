"""The kNN query service over a training run's bank, a snapshot, or a running feature store.

    python -m knn_service.serve (--run RUN_DIR | --snapshot URI | --store-name NAME)
        [--train-data DIR_OR_URL] [--checkpoint PATH] [--host 127.0.0.1] [--port 8000]
        [--refresh-seconds N] [--kind flat|ivf] [--max-k 1000] [--max-queries 1024]
        [--max-body-bytes 8388608]

Where the bank comes from (:mod:`knn_service.bank_sources`):

- ``--run RUN_DIR`` (``trainer.run --output``): the run's newest bank snapshot (or, for an
  in-process bank, its newest checkpoint), its exported encoder and its training data's
  labels, all read from files: no cluster to start;
- ``--snapshot URI``: a store snapshot, or a snapshot directory (its newest snapshot, looked
  up again on every rebuild);
- ``--store-name NAME``: a running feature store, attached over Ray (``RAY_ADDRESS``, or the
  running local cluster).

The service builds a FAISS/torch index from the bank and serves the HTTP API of
:mod:`knn_service.http_app` from this process (aiohttp), rebuilding the index on ``POST
/refresh`` and every ``--refresh-seconds``. ``--train-data`` supplies neighbour labels, keys
and source paths (and enables ``/classify``); ``--checkpoint`` (exported encoder, training
checkpoint or run directory) enables image queries; ``--run`` gives both unless they are
named. Query vectors are L2-normalized before the search; the similarity is the inner
product with the bank row (the cosine, as the store's momentum update keeps rows unit
length). It binds 127.0.0.1 unless ``--host`` says otherwise; with ``NPID_API_TOKEN`` set
every route but ``/healthz`` needs ``Authorization: Bearer <token>``. A non-loopback
``--host`` without a token is refused unless ``--insecure`` is given.

Bad arguments (no such run, snapshot or store, unreadable data or checkpoint, mismatched
dims or row counts, a port in use) print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
from typing import TYPE_CHECKING

from knn_service.cli import (
    DEFAULT_MAX_BODY_BYTES,
    DefaultsHelpFormatter,
    OneLineParser,
    UsageError,
    non_negative_float,
    port_number,
    positive_int,
)

if TYPE_CHECKING:  # the heavy modules are imported when serving starts: --help stays fast
    from knn_service.bank_sources import BankSource
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
        formatter_class=DefaultsHelpFormatter,
        epilog=f"Authentication: set {TOKEN_ENV} to require 'Authorization: Bearer <token>' "
        "on every route but /healthz (unset or empty: no token).",
    )
    bank = p.add_mutually_exclusive_group(required=True)
    bank.add_argument(
        "--run",
        help="a training run's output directory: its newest bank snapshot, exported encoder "
        "and training labels (no cluster needed)",
    )
    bank.add_argument(
        "--snapshot", help="a store snapshot, or a directory of them (the newest; no cluster)"
    )
    bank.add_argument("--store-name", help="name of a running feature store (over Ray)")
    p.add_argument("--namespace", default=DEFAULT_NAMESPACE, help="Ray namespace of --store-name")
    p.add_argument(
        "--train-data",
        help="training shards (labels, keys; enables /classify; default with --run: the run's)",
    )
    p.add_argument(
        "--checkpoint",
        help="exported encoder, training checkpoint or run dir (image queries; default with "
        "--run: the run's encoder)",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help=f"address to bind; any but loopback needs {TOKEN_ENV} (or --insecure)",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help=f"allow a non-loopback --host without {TOKEN_ENV}: anyone who reaches it can query",
    )
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


def open_bank(args: argparse.Namespace) -> BankSource:
    """The bank source the arguments name (``--run``, ``--snapshot`` or ``--store-name``).

    Raises:
        UsageError: nothing readable there (message names the flag).
    """
    from knn_service import bank_sources

    if args.run is not None:
        try:
            return bank_sources.run_source(args.run)
        except (OSError, ValueError) as exc:
            raise UsageError(f"--run {args.run}: {exc}") from None
    if args.snapshot is not None:
        try:
            return bank_sources.snapshot_source(args.snapshot)
        except (OSError, ValueError) as exc:
            raise UsageError(f"--snapshot {args.snapshot}: {exc}") from None
    from featurestore.store import ShardedStore  # imports Ray

    try:
        store = ShardedStore.attach(args.store_name, namespace=args.namespace)
    except (LookupError, ValueError) as exc:
        raise UsageError(f"--store-name {args.store_name}: {exc}") from None
    return bank_sources.store_source(store)


def _bank_flag(args: argparse.Namespace) -> str:
    if args.run is not None:
        return f"--run {args.run}"
    if args.snapshot is not None:
        return f"--snapshot {args.snapshot}"
    return f"--store-name {args.store_name}"


def build_service(args: argparse.Namespace) -> tuple[KnnService, BankSource]:
    """Open the bank, load labels and encoder, build the first index.

    Returns:
        ``(service, bank source)``.

    Raises:
        UsageError: a bad input (message names it).
    """
    from knn_service.encoders import load_encoder_from
    from knn_service.query_engine import KnnService
    from knn_service.train_labels import TrainLabels
    from trainer.api import dataset_location

    bank = open_bank(args)
    flag = _bank_flag(args)
    train = None
    train_flag = "--train-data"
    train_data = args.train_data
    if train_data is None and bank.train_data is not None:
        train_data, train_flag = bank.train_data, f"{flag} (its training data)"
    if train_data is not None:
        shown = args.train_data or train_data
        try:
            train_data = dataset_location(train_data, "train")  # also the built-in "digits"
            train = TrainLabels.load(train_data)
        except (OSError, ValueError) as exc:
            raise UsageError(f"{train_flag} {shown}: {exc}") from None
    encoder = None
    checkpoint, checkpoint_flag = args.checkpoint, "--checkpoint"
    if checkpoint is None and bank.encoder is not None:
        checkpoint, checkpoint_flag = bank.encoder, f"{flag} (its encoder)"
    if checkpoint is not None:
        try:
            encoder = load_encoder_from(checkpoint, train_data, device=args.device)
        except (OSError, ValueError, RuntimeError) as exc:
            raise UsageError(f"{checkpoint_flag} {checkpoint}: {exc}") from None
    if encoder is not None and encoder.dim != bank.dim:
        raise UsageError(
            f"{checkpoint_flag} {checkpoint} embeds in {encoder.dim} dims but the bank of "
            f"{flag} has dim {bank.dim}"
        )
    if train is not None and train.num_instances != bank.num_rows:
        raise UsageError(
            f"{train_flag} {args.train_data or train_data} has {train.num_instances} "
            f"instances but the bank of {flag} has {bank.num_rows} rows"
        )
    service = KnnService(
        bank.export,
        dim=bank.dim,
        kind=args.kind,
        train=train,
        encoder=encoder,
        max_k=args.max_k,
        max_queries=args.max_queries,
        rows=bank.rows,
    )
    try:
        service.refresh()
    except (OSError, ValueError) as exc:
        raise UsageError(f"{flag}: {exc}") from None
    return service, bank


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


def _loopback(host: str) -> bool:
    from featurestore.ray_connect import is_loopback

    return is_loopback(f"{host}:0")


def preflight(args: argparse.Namespace) -> None:
    """The checks that need neither torch nor the bank, before either loads (seconds):
    a local ``--run`` or ``--snapshot`` that does not exist, and a port already taken.

    Raises:
        UsageError: naming the flag (or the address) and why.
    """
    if not _loopback(args.host) and not os.environ.get(TOKEN_ENV) and not args.insecure:
        raise UsageError(
            f"--host {args.host} is not loopback: set {TOKEN_ENV} (clients then send "
            "'Authorization: Bearer <token>') or pass --insecure to serve it open"
        )
    for flag, value in (("--run", args.run), ("--snapshot", args.snapshot)):
        if value is not None and "://" not in value and not os.path.exists(value):
            raise UsageError(f"{flag} {value}: no such directory")
    if args.port:
        try:
            socket.create_server((args.host, args.port)).close()  # SO_REUSEADDR, as asyncio
        except OSError as exc:
            raise UsageError(f"cannot listen on {args.host}:{args.port}: {exc}") from None


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    try:
        preflight(args)
    except UsageError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    settings = settings_from_args(args)
    if settings.api_token is None and not _loopback(args.host):
        logger.warning(
            "serving on %s without %s (--insecure): anyone who can reach it can query",
            args.host,
            TOKEN_ENV,
        )
    try:
        service, bank = build_service(args)
        logger.info("bank: %s", bank.described)
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
