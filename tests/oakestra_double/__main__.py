"""``python -m oakestra_double`` (with ``tests/`` on ``sys.path``; or ``python -m
tests.oakestra_double`` from the repository root): serve the Oakestra double until SIGTERM.

Options: ``--host`` (127.0.0.1), ``--port`` (10000), ``--user NAME:PASSWORD`` (repeatable;
default ``Admin:Admin``), ``--worker CLUSTER:HOSTNAME[:ARCH]`` (repeatable; default
``cluster1:worker1:<this machine's arch>``), ``--access-token-lifetime-s`` (600),
``--refresh-token-lifetime-s`` (30 days), ``--report-delay-s`` (0.5: how late worker-side
statuses reach the root; Oakestra's cluster pushes every 15 s), ``--schedule-delay-s`` (0.1),
``--restart-delay-s`` (15: when the cluster manager restarts a FAILED, DEAD or
NO_WORKER_CAPACITY instance), ``--worker-vcpus`` (8) and ``--worker-memory-mb`` (16384) of each
worker, ``--organization NAME`` (repeatable; default ``root``), ``--workdir`` (instance logs; a
temp dir by default), ``--process-image REF=JSON_ARGV`` (repeatable: run instances as host
processes, image ``REF`` running the argv, instead of with buildah). Prints ``oakestra double
on http://HOST:PORT`` when it serves. On SIGTERM or SIGINT it undeploys every instance
(killing its processes, removing its container) and exits 0.
"""

import argparse
import json
import logging
import signal
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

import waitress

from .api import create_app
from .root import Root
from .tokens import TokenIssuer
from .worker import WorkerSpec


def main(argv: Sequence[str] | None = None) -> None:
    """Parse ``argv``, serve, and clean up on SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(prog="oakestra_double", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=10000)
    parser.add_argument("--user", action="append", default=[], metavar="NAME:PASSWORD")
    parser.add_argument("--worker", action="append", default=[], metavar="CLUSTER:HOSTNAME[:ARCH]")
    parser.add_argument("--access-token-lifetime-s", type=float, default=600.0)
    parser.add_argument("--refresh-token-lifetime-s", type=float, default=30 * 24 * 3600.0)
    parser.add_argument("--report-delay-s", type=float, default=0.5)
    parser.add_argument("--schedule-delay-s", type=float, default=0.1)
    parser.add_argument("--restart-delay-s", type=float, default=15.0)
    parser.add_argument("--worker-vcpus", type=int, default=8)
    parser.add_argument("--worker-memory-mb", type=int, default=16384)
    parser.add_argument("--organization", action="append", default=[], metavar="NAME")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--process-image", action="append", default=[], metavar="REF=JSON_ARGV")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    users = dict(item.split(":", 1) for item in args.user or ["Admin:Admin"])
    workers = [WorkerSpec.parse(item) for item in args.worker] or [
        WorkerSpec("cluster1", "worker1")
    ]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="oakestra-double-"))
    workdir.mkdir(parents=True, exist_ok=True)
    root = Root(
        users,
        workers,
        workdir,
        report_delay_s=args.report_delay_s,
        schedule_delay_s=args.schedule_delay_s,
        restart_delay_s=args.restart_delay_s,
        worker_vcpus=args.worker_vcpus,
        worker_memory_mb=args.worker_memory_mb,
        organizations=tuple(args.organization or ["root"]),
        process_images=_process_images(args.process_image),
    )
    tokens = TokenIssuer(args.access_token_lifetime_s, args.refresh_token_lifetime_s)
    server = waitress.create_server(
        create_app(root, tokens), host=args.host, port=args.port, threads=8
    )
    stop = threading.Event()

    def _stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    threading.Thread(target=server.run, name="api", daemon=True).start()
    print(f"oakestra double on http://{args.host}:{server.effective_port}", flush=True)
    while not stop.wait(timeout=1.0):
        pass
    root.shutdown()
    sys.exit(0)


def _process_images(items: Sequence[str]) -> dict[str, list[str]] | None:
    """``["REF=[\"argv\", ...]", ...]`` → ``{REF: argv}``; ``None`` without any."""
    if not items:
        return None
    images = {}
    for item in items:
        ref, _, argv = item.partition("=")
        images[ref] = [str(part) for part in json.loads(argv)]
    return images


if __name__ == "__main__":
    main()
