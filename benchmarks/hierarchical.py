"""Classic FL against hierarchical FL (HFL) on the same learners, measured side by side in one run.

Runs the example repository (``examples/mnist_sklearn``, FedAvg) twice on the same learners, each
on its own Arrow Flight data server holding an IID share of MNIST, with the same total number
of learner rounds:

- classic: one aggregator over all learners for ``cycles x rounds`` rounds;
- HFL: a root aggregator over ``clusters`` cluster aggregators for ``cycles`` cycles, each
  cluster aggregator running ``rounds`` rounds over its ``learners-per-cluster`` learners per
  cycle.

For the top aggregator (the classic aggregator, the HFL root) it prints the bytes it sends
and receives over its Flower connections, counted by a TCP relay between it and its Flower
clients (the learners, the cluster aggregators); the wall time from starting the processes to
the top aggregator's exit, and the part of it from its ``started`` to its ``training_done``
message (training without process start-up and model logging); and the final accuracy of its
MQTT ``success`` message. Then the traffic ratio classic / HFL (goal: at least
``learners-per-cluster x rounds``, the model exchanges a cluster aggregator keeps off the root
per cycle), the accuracy difference (goal: within 0.02) and the wall time ratio. Goals are
printed, not asserted.

Every model exchange carries the same bytes (the example starts from float32 zeros, like the
models trained on its float32 pixels; with float64 initial parameters the first round's
download was twice as large and the ratio 3.71), so the ratio lands at the goal up to each
connection's handshake (3.99 measured).

Usage: ``uv run python benchmarks/hierarchical.py [--clusters 2] [--learners-per-cluster 2]
[--cycles 2] [--rounds 2] [--logs DIR]``.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from data_server.mock_provider import provide_mock_data
from data_server.server import DataServer
from flops_manager.broker import MosquittoBroker
from flops_manager.demo import EXAMPLE_REPO, example_sla
from flops_utils import env_vars
from flops_utils.net import find_free_port, wait_for_port
from observatory.mlflow_server import MlflowServer

PROJECT_TIMEOUT_S = 300.0
"""Seconds one project (classic or HFL) may take before its processes are killed."""
SUCCESS_WAIT_S = 10.0
"""Seconds to wait for the top aggregator's ``success`` message after it exited (it publishes
with QoS 1 just before exiting)."""
RELAY_CHUNK_BYTES = 65536


class ByteCountingRelay:
    """A TCP relay from a local port to ``target`` that counts the bytes in each direction.

    Args:
        target: ``(host, port)`` of the server (the top aggregator's Flower server).
        ready_timeout_s: seconds to wait for ``target`` to accept connections.

    The listening port is bound at construction (``address`` is ``127.0.0.1:PORT``) but only
    listens once ``target`` accepts connections, so that clients retrying a refused
    connection (the learners, the cluster aggregators) reach the server through the relay.
    ``to_server_bytes`` / ``to_clients_bytes``: bytes forwarded so far. A context manager.
    """

    def __init__(self, target: tuple[str, int], ready_timeout_s: float = PROJECT_TIMEOUT_S) -> None:
        self.target = target
        self.ready_timeout_s = ready_timeout_s
        self.to_server_bytes = 0
        self.to_clients_bytes = 0
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", find_free_port()))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._connections: list[socket.socket] = []

    def __enter__(self) -> "ByteCountingRelay":
        threading.Thread(target=self._serve, daemon=True).start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stopped.set()
        self._listener.close()
        with self._lock:
            for connection in self._connections:
                connection.close()

    def _serve(self) -> None:
        try:
            if not wait_for_port(*self.target, self.ready_timeout_s):
                return
            self._listener.listen()
        except OSError:  # closed by __exit__
            return
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed by __exit__
                return
            try:
                server = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self._connections += [client, server]
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, to_server: bool) -> None:
        """Forward ``source`` to ``sink`` until either side closes, counting the bytes."""
        with suppress(OSError):  # a side closed or reset: the connection is over
            while chunk := source.recv(RELAY_CHUNK_BYTES):
                sink.sendall(chunk)
                with self._lock:
                    if to_server:
                        self.to_server_bytes += len(chunk)
                    else:
                        self.to_clients_bytes += len(chunk)
        for sock in (sink, source):
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class StatusListener:
    """Records the top aggregator's status messages (``flops/<project_id>/aggregator/...``):
    the arrival times (monotonic) of ``started`` and of the ``training_done`` progress, and
    the ``success`` data. A real paho subscriber; the constructor returns once the
    subscription is acknowledged."""

    def __init__(self, broker: MosquittoBroker, project_id: str) -> None:
        self.prefix = f"flops/{project_id}/aggregator/"
        self.started_at: float | None = None
        self.training_done_at: float | None = None
        self.success: dict[str, Any] | None = None
        self._arrived = threading.Event()
        subscribed = threading.Event()
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2)
        self._client.on_message = self._on_message
        self._client.on_subscribe = lambda *_: subscribed.set()
        self._client.on_connect = lambda c, *_: c.subscribe(self.prefix + "+", qos=1)
        self._client.connect(broker.host, broker.port)
        self._client.loop_start()
        if not subscribed.wait(10):
            raise RuntimeError(f"could not subscribe to {self.prefix}+ on {broker.url}")

    def _on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        now = time.monotonic()
        status = message.topic.removeprefix(self.prefix)
        data = json.loads(message.payload).get("data") or {}
        if status == "started":
            self.started_at = now
        elif status == "progress" and data.get("stage") == "training_done":
            self.training_done_at = now
        elif status == "success":
            self.success = data
            self._arrived.set()

    def wait_for_success(self, timeout_s: float) -> dict[str, Any]:
        """The ``success`` data; ``RuntimeError`` if none came within ``timeout_s``."""
        if not self._arrived.wait(timeout_s) or self.success is None:
            raise RuntimeError(f"no message on {self.prefix}success")
        return self.success

    def training_seconds(self) -> float:
        """Seconds from ``started`` (the Flower server listens) to ``training_done`` (the
        last round or cycle aggregated); ``RuntimeError`` when either is missing."""
        if self.started_at is None or self.training_done_at is None:
            raise RuntimeError(f"no started or training_done message on {self.prefix}")
        return self.training_done_at - self.started_at

    def close(self) -> None:
        """Disconnect."""
        self._client.disconnect()
        self._client.loop_stop()


@dataclass(frozen=True)
class Services:
    """The shared services of both projects and the learners' data servers."""

    broker: MosquittoBroker
    mlflow: MlflowServer
    nodes: dict[str, str]
    """``{learner name: grpc://HOST:PORT of its data server}``, in cluster order."""
    logs: Path


@dataclass(frozen=True)
class Measurement:
    """One project's top aggregator: bytes sent to / received from its Flower clients, wall
    time (processes started to its exit), training time (its ``started`` to its
    ``training_done`` message) and final accuracy."""

    sent_bytes: int
    received_bytes: int
    seconds: float
    training_seconds: float
    accuracy: float

    @property
    def total_bytes(self) -> int:
        """Bytes in both directions."""
        return self.sent_bytes + self.received_bytes


class Project:
    """The processes of one project: started with :meth:`start`, each logging to a file;
    :meth:`finish` waits for the top aggregator, then for the others, and kills what is left
    at the deadline."""

    def __init__(self, services: Services, sla: dict[str, Any]) -> None:
        self.services = services
        self.project_id = uuid.uuid4().hex[:12]
        self.sla = sla
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, module: str, env: dict[str, str]) -> None:
        """Start ``python -m module`` as ``name`` with the project's common ``FLOPS_*`` and
        ``env`` on top."""
        base = {k: v for k, v in os.environ.items() if not k.startswith("FLOPS_")}
        common = {
            env_vars.PROJECT_ID: self.project_id,
            env_vars.MQTT_URL: self.services.broker.url,
            env_vars.ML_REPO_DIR: str(EXAMPLE_REPO),
            env_vars.MLFLOW_URL: self.services.mlflow.url,
            env_vars.SLA: json.dumps(self.sla),
        }
        log = self.services.logs / f"{self.project_id}-{name}.log"
        with log.open("w") as out:
            self.processes[name] = subprocess.Popen(
                [sys.executable, "-m", module],
                env={**base, **common, **env},
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def start_learner(self, node: str, aggregator: str) -> None:
        """Start the learner ``node`` on its data server for the Flower server ``aggregator``."""
        self.start(
            node,
            "learner",
            {
                env_vars.AGGREGATOR_ADDRESS: aggregator,
                env_vars.DATA_SERVER: self.services.nodes[node],
                env_vars.DATA_TAGS: "mnist",
                env_vars.LEARNER_NAME: node,
            },
        )

    def finish(self, top: str, began: float) -> float:
        """Wait for the process ``top``, then for the others; returns the seconds from
        ``began`` (monotonic) to ``top``'s exit. ``RuntimeError`` naming the logs when a
        process failed or outlived :data:`PROJECT_TIMEOUT_S`."""
        deadline = began + PROJECT_TIMEOUT_S
        order = [top, *(name for name in self.processes if name != top)]
        seconds = 0.0
        failed: list[str] = []
        for name in order:
            process = self.processes[name]
            try:
                code = process.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
                code = -9
            if name == top:
                seconds = time.monotonic() - began
            if code != 0:
                failed.append(f"{name} (exit {code})")
        if failed:
            logs = self.services.logs / f"{self.project_id}-*.log"
            raise RuntimeError(f"project {self.project_id}: {', '.join(failed)}; see {logs}")
        return seconds


@contextmanager
def services(learners: int, logs: Path | None = None) -> Iterator[Services]:
    """Mosquitto, an MLflow server and ``learners`` data servers holding IID shares of MNIST
    (tag ``mnist``) in a temporary directory; the processes' logs go to ``logs`` (created if
    missing) or into that directory."""
    with tempfile.TemporaryDirectory(prefix="flops-hfl-bench-") as tmp, ExitStack() as stack:
        home = Path(tmp)
        broker = stack.enter_context(MosquittoBroker(home / "mosquitto"))
        mlflow = stack.enter_context(MlflowServer(home / "mlflow"))
        names = [f"node-{i + 1}" for i in range(learners)]
        servers = [stack.enter_context(DataServer(home / name)) for name in names]
        nodes = {name: server.location for name, server in zip(names, servers, strict=True)}
        provide_mock_data("mnist", nodes, tag="mnist", partitioning="iid")
        logs = logs or home / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        yield Services(broker, mlflow, nodes, logs)


def measure(
    project: Project, relay: ByteCountingRelay, listener: StatusListener, began: float
) -> Measurement:
    """Wait for ``project``'s end; read the relay's counts and the top aggregator's messages."""
    try:
        seconds = project.finish("aggregator", began)
        success = listener.wait_for_success(SUCCESS_WAIT_S)
        training_s = listener.training_seconds()
    finally:
        listener.close()
    return Measurement(
        relay.to_clients_bytes,
        relay.to_server_bytes,
        seconds,
        training_s,
        float(success["accuracy"]),
    )


def run_classic(env: Services, cycles: int, rounds: int) -> Measurement:
    """One aggregator over every learner for ``cycles * rounds`` rounds."""
    learners = len(env.nodes)
    sla = example_sla(
        cycles * rounds,
        mode="classic",
        min_available_clients=learners,
        min_fit_clients=learners,
        min_evaluate_clients=learners,
    )
    project = Project(env, sla)
    listener = StatusListener(env.broker, project.project_id)
    address = ("127.0.0.1", find_free_port())
    began = time.monotonic()
    with ByteCountingRelay(address) as relay:
        project.start(
            "aggregator", "aggregator", {env_vars.AGGREGATOR_ADDRESS: "{}:{}".format(*address)}
        )
        for node in env.nodes:
            project.start_learner(node, relay.address)
        return measure(project, relay, listener, began)


def run_hierarchical(env: Services, clusters: int, cycles: int, rounds: int) -> Measurement:
    """A root over ``clusters`` cluster aggregators for ``cycles`` cycles of ``rounds`` rounds;
    the learners are split into consecutive groups of equal size, one per cluster."""
    per_cluster = len(env.nodes) // clusters
    sla = example_sla(
        rounds,
        mode="hierarchical",
        training_cycles=cycles,
        min_available_clients=per_cluster,
        min_fit_clients=per_cluster,
        min_evaluate_clients=per_cluster,
    )
    project = Project(env, sla)
    listener = StatusListener(env.broker, project.project_id)
    names = [f"c{i + 1}" for i in range(clusters)]
    root = ("127.0.0.1", find_free_port())
    began = time.monotonic()
    with ByteCountingRelay(root) as relay:
        project.start(
            "aggregator",
            "aggregator",
            {
                env_vars.AGGREGATOR_ROLE: "root",
                env_vars.AGGREGATOR_ADDRESS: "{}:{}".format(*root),
                env_vars.CLUSTERS: ",".join(names),
            },
        )
        nodes = list(env.nodes)
        for index, cluster in enumerate(names):
            members = nodes[index * per_cluster : (index + 1) * per_cluster]
            address = f"127.0.0.1:{find_free_port()}"
            project.start(
                f"cluster-{cluster}",
                "aggregator",
                {
                    env_vars.AGGREGATOR_ROLE: "cluster",
                    env_vars.CLUSTER: cluster,
                    env_vars.AGGREGATOR_ADDRESS: address,
                    env_vars.ROOT_AGGREGATOR_ADDRESS: relay.address,
                    env_vars.LEARNERS: ",".join(members),
                },
            )
            for node in members:
                project.start_learner(node, address)
        return measure(project, relay, listener, began)


def report(classic: Measurement, hfl: Measurement, reduction_goal: int) -> None:
    """Print the table and the ratios with their goals."""
    rows: list[tuple[str, float, float, str]] = [
        ("sent over Flower (kB)", classic.sent_bytes / 1000, hfl.sent_bytes / 1000, ".1f"),
        (
            "received over Flower (kB)",
            classic.received_bytes / 1000,
            hfl.received_bytes / 1000,
            ".1f",
        ),
        ("total (kB)", classic.total_bytes / 1000, hfl.total_bytes / 1000, ".1f"),
        ("wall time (s)", classic.seconds, hfl.seconds, ".1f"),
        ("  of it training (s)", classic.training_seconds, hfl.training_seconds, ".1f"),
        ("final accuracy", classic.accuracy, hfl.accuracy, ".4f"),
    ]
    print(f"{'top aggregator':28}{'classic':>12}{'HFL root':>12}")
    for label, a, b, spec in rows:
        print(f"{label:28}{a:>12{spec}}{b:>12{spec}}")
    traffic_ratio = classic.total_bytes / max(hfl.total_bytes, 1)
    accuracy_difference = hfl.accuracy - classic.accuracy
    print(f"traffic ratio classic / HFL: {traffic_ratio:.2f} (goal >= {reduction_goal})")
    print(f"accuracy difference HFL - classic: {accuracy_difference:+.4f} (goal within 0.02)")
    print(
        f"wall time ratio HFL / classic: {hfl.seconds / classic.seconds:.2f} "
        f"(training only: {hfl.training_seconds / classic.training_seconds:.2f})"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clusters", type=int, default=2)
    parser.add_argument("--learners-per-cluster", type=int, default=2)
    parser.add_argument("--cycles", type=int, default=2, help="HFL cycles (root rounds)")
    parser.add_argument("--rounds", type=int, default=2, help="cluster rounds per HFL cycle")
    parser.add_argument("--logs", type=Path, help="keep the processes' logs in this directory")
    args = parser.parse_args()
    if min(args.clusters, args.learners_per_cluster, args.cycles, args.rounds) < 1:
        parser.error("every option must be at least 1")
    learners = args.clusters * args.learners_per_cluster
    began = time.monotonic()
    with services(learners, args.logs) as env:
        classic = run_classic(env, args.cycles, args.rounds)
        hfl = run_hierarchical(env, args.clusters, args.cycles, args.rounds)
    print(
        f"example mnist_sklearn, {learners} learners (IID MNIST shares); classic: "
        f"{args.cycles * args.rounds} rounds; HFL: {args.clusters} clusters x "
        f"{args.learners_per_cluster} learners, {args.cycles} cycles x {args.rounds} rounds"
    )
    report(classic, hfl, args.learners_per_cluster * args.rounds)
    print(f"benchmark wall time: {time.monotonic() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
