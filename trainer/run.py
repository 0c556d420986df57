"""``python -m trainer.run``: train an encoder by non-parametric instance discrimination.

With no arguments: a local Ray instance, CPU, the built-in dataset, the small encoder,
a complete run in minutes. On a cluster: ``ray job submit -- python -m trainer.run
--data s3://… --output …`` (``RAY_ADDRESS`` is honoured). Flags: ``--help``.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from pathlib import Path

from trainer.config import ConfigError
from trainer.flags import parse_config
from trainer.guard import TrainingStoppedError
from trainer.metrics import read_jsonl


class Terminated(KeyboardInterrupt):
    """SIGTERM (``ray job stop``, a scheduler's preemption), raised where the run is so that
    its ``finally`` blocks run: the store it created is made of detached actors, which
    would otherwise outlive the job and hold their memory."""


def _raise_terminated(signum: int, _frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends it at once
    raise Terminated(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    """Run; returns the exit code (2 for bad input, 1 for a failed run, 143 after SIGTERM,
    130 after Ctrl-C)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    log = logging.getLogger("trainer.run")
    try:
        cfg = parse_config(argv)
        from trainer.plan import make_plan  # imports torch: after the flags are checked

        plan = make_plan(cfg)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if cfg.launcher == "local":
        from trainer.launch import local as driver  # no Ray on this path
    else:
        from trainer.launch import driver  # type: ignore[no-redef]

    from trainer.run_record import record_outcome, write_run_record

    write_run_record(plan)  # what knn_service.serve --run RUN_DIR reads
    log.info(
        "npid: %d instances, %s, arch %s, %d epochs, output %s",
        plan.num_rows,
        plan.objective["kind"],
        plan.arch,
        plan.epochs,
        plan.output,
    )
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        driver.run(cfg, plan)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingStoppedError as exc:
        print(f"error: training stopped: {exc}", file=sys.stderr)
        return 1
    except Terminated:
        print("stopped by SIGTERM (a store this run created was shut down); resume with "
              "--resume", file=sys.stderr)  # fmt: skip
        return 143
    except KeyboardInterrupt:
        print("interrupted; resume with --resume", file=sys.stderr)
        return 130
    except Exception as exc:  # a failed run: one line, the details are in the log above
        log.debug("run failed", exc_info=True)
        print(f"error: training failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    records = read_jsonl(Path(plan.output) / "metrics.jsonl")
    skipped = record_outcome(plan.output, records)
    if skipped["total"]:
        log.warning(
            "npid: skipped %d corrupt or missing samples in all (per epoch in run.json)",
            skipped["total"],
        )
    if records:
        log.info("npid: final %s", json.dumps(records[-1], sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
