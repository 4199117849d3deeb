"""The main job (``flops demo``): a real FL project from SLA to trained model on this machine.

It starts the embedded suite (manager, store, Mosquitto, MLflow), two worker nodes (one
``flops-data-server`` process each), pushes MNIST partitions to them through ``POST /mocks``,
POSTs the example SLA over HTTP and follows the project until it ends.
"""

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import requests

from flops_manager.client import REQUEST_TIMEOUT_S, ManagerClient
from flops_utils import env_vars
from flops_utils.net import find_free_port, wait_for_port
from flops_utils.processes import stop_process_groups

if TYPE_CHECKING:
    from flops_manager.cli_progress import Activity
    from flops_manager.suite import ManagerSuite
    from flops_utils.data_client import DataClient

SOURCE_ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_REPO = SOURCE_ROOT / "examples" / "mnist_sklearn"
NODE_START_TIMEOUT_S = 300.0
"""Seconds a data server may take to listen while its process runs (it imports pyarrow and
the datasets libraries: a few seconds idle, a minute on a loaded machine); a data server
that exits fails the start at once."""
NODE_REGISTER_TIMEOUT_S = 300.0
"""Seconds ``flops demo`` waits for its listening data servers to register."""
NODE_STOP_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class LocalNode:
    """A worker node on this machine: its id, data directory and Flight data server address."""

    node_id: str
    data_dir: Path
    location: str

    def client(self) -> "DataClient":
        """A data client of this node's data server with the node owner's credential (read,
        write and drop every tag), over TLS when the data server serves it."""
        from data_server.security import owner_credentials
        from flops_utils.data_client import DataClient

        token, cert = owner_credentials(self.data_dir)
        if not cert:
            return DataClient(self.location, token="", tls_root_certs="")
        return DataClient(self.location, token=token, tls_root_certs=cert)


@contextmanager
def local_nodes(
    count: int,
    workdir: Path,
    manager_url: str,
    token: str | None = None,
    register_interval_s: float = 10.0,
    clusters: int = 1,
    first: int = 1,
    secure: bool = True,
) -> Iterator[list[LocalNode]]:
    """Run ``count`` data servers (``node-1`` ...) as child processes registered with the manager.

    ``token`` is the manager's API token (an admin token); each data server gets a node
    credential the admin token issues (``POST /nodes/{id}/credential``), not the admin token.
    ``clusters``: the nodes are spread over that many clusters (``--cluster``), in turn:
    with 1 every node is in ``local``; with 2, ``node-1`` and ``node-3`` are in
    ``cluster-1``, ``node-2`` and ``node-4`` in ``cluster-2``. ``first``: the number of the
    first node (``node-<first>``), to add nodes next to running ones. ``secure``: the data
    servers serve TLS and check data tokens (``False``: ``--insecure``, for a manager with
    ``FLOPS_INSECURE=data``).

    Each serves ``workdir/<node_id>`` on a free loopback port. They are stopped (SIGTERM, then
    SIGKILL after ``NODE_STOP_TIMEOUT_S``) on exit. Raises ``TimeoutError`` when one does not
    listen within ``NODE_START_TIMEOUT_S``.
    """
    processes: list[subprocess.Popen[bytes]] = []
    nodes: list[LocalNode] = []
    try:
        for index in range(1, count + 1):
            node_id = f"node-{first + index - 1}"
            data_dir = workdir / node_id
            data_dir.mkdir(parents=True, exist_ok=True)
            port = find_free_port()
            credential = node_credential(manager_url, token, node_id) if token else ""
            log = (workdir / f"{node_id}.log").open("ab")
            processes.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "data_server",
                        "--data-dir",
                        str(data_dir),
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(port),
                        "--node-id",
                        node_id,
                        "--manager-url",
                        manager_url,
                        "--register-interval-s",
                        str(register_interval_s),
                        "--cluster",
                        node_cluster(index, clusters),
                        *([] if secure else ["--insecure"]),
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env={**os.environ, env_vars.API_TOKEN: credential},
                    start_new_session=True,
                )
            )
            log.close()
            nodes.append(LocalNode(node_id, data_dir, f"grpc://127.0.0.1:{port}"))
        for node, process in zip(nodes, processes, strict=True):
            _wait_for_data_server(node, process, workdir / f"{node.node_id}.log")
        yield nodes
    finally:
        stop_process_groups(processes, NODE_STOP_TIMEOUT_S)


def _wait_for_data_server(node: LocalNode, process: subprocess.Popen[bytes], log: Path) -> None:
    """Wait until ``node``'s data server listens. Raises ``TimeoutError`` when its process
    exits first (at once, with its log's last line) or after ``NODE_START_TIMEOUT_S``."""
    port = int(node.location.rsplit(":", 1)[1])
    deadline = time.monotonic() + NODE_START_TIMEOUT_S
    while not wait_for_port("127.0.0.1", port, 1.0):
        if process.poll() is not None or time.monotonic() > deadline:
            lines = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
            why = (
                f"exited with code {process.returncode}"
                if process.returncode is not None
                else f"did not listen within {NODE_START_TIMEOUT_S:g} s"
            )
            raise TimeoutError(
                f"the data server of {node.node_id} did not start: it {why}"
                + (f"; last log line: {lines[-1][:200]!r}" if lines else "")
                + f" (log: {log})"
            )


def node_credential(manager_url: str, admin_token: str, node_id: str) -> str:
    """A node credential for ``node_id`` issued by the manager at ``manager_url`` with the
    admin's ``admin_token``. Raises ``requests.HTTPError`` when the manager refuses."""
    response = requests.post(
        f"{manager_url}/api/flops/nodes/{node_id}/credential",
        headers={"Authorization": f"Bearer {admin_token}"},
        timeout=REQUEST_TIMEOUT_S,
    )
    response.raise_for_status()
    token: str = response.json()["token"]
    return token


def node_cluster(index: int, clusters: int) -> str:
    """The cluster of the ``index``-th (from 1) of the demo's nodes spread over ``clusters``
    clusters: ``local`` for one cluster, else ``cluster-<k>``."""
    return "local" if clusters <= 1 else f"cluster-{(index - 1) % clusters + 1}"


def example_sla(rounds: int | None = None, **training: Any) -> dict[str, Any]:
    """The example repository's SLA with ``ml_repo_url`` made absolute.

    ``rounds`` overrides ``training_rounds``; other keyword arguments override other fields of
    ``training_configuration``.
    """
    sla: dict[str, Any] = json.loads((EXAMPLE_REPO / "sla.json").read_text())
    sla["ml_repo_url"] = str(EXAMPLE_REPO)
    if rounds is not None:
        sla["training_configuration"]["training_rounds"] = rounds
    sla["training_configuration"].update(training)
    return sla


def run_project(
    client: ManagerClient,
    sla: dict[str, Any],
    timeout_s: float,
    on_event: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """POST ``sla``, follow the project until it ends and return its final document."""
    project_id = client.create_project(sla)
    return client.wait_for_project(project_id, timeout_s, on_event)


def demo_home() -> Path:
    """``$FLOPS_HOME`` or ``./.flops``: where the demo keeps its store, MLflow data and caches."""
    return Path(os.environ.get("FLOPS_HOME", ".flops"))


@dataclass(frozen=True)
class DemoShape:
    """What ``flops demo`` runs: ``nodes`` local nodes in ``clusters`` clusters, ``rounds``
    training rounds (per cycle), and ``cycles`` root cycles for hierarchical FL (``None``:
    classic FL)."""

    nodes: int
    clusters: int
    rounds: int
    cycles: int | None = None


def run_demo(
    activity: "Activity", suite: "ManagerSuite", shape: DemoShape, timeout_s: float
) -> dict[str, Any]:
    """Start the demo's nodes next to the started ``suite``, push MNIST partitions to them,
    submit the example SLA and follow the project to its end, showing each wait on
    ``activity``; returns the project's final document. The nodes are stopped on return.

    Raises ``TimeoutError`` when a node does not start or register (see
    :func:`local_nodes`), or the project does not end within ``timeout_s`` seconds, and
    ``FlopsError`` when the manager refuses a request or the mock push fails.
    """
    from flops_manager.auth import read_api_token
    from flops_manager.cli_progress import follow_project

    token = read_api_token(suite.config.home)
    client = ManagerClient(suite.url, token=token)
    per_cluster = shape.nodes // shape.clusters
    with ExitStack() as stack:
        with activity.step(f"starting {shape.nodes} data servers (worker nodes)"):
            workers = stack.enter_context(
                local_nodes(
                    shape.nodes,
                    suite.config.home / "nodes",
                    suite.url,
                    token,
                    clusters=shape.clusters,
                    secure=suite.config.secure("data"),
                )
            )
        with activity.step(f"waiting for {len(workers)} nodes to register"):
            client.wait_for_nodes(len(workers), timeout_s=NODE_REGISTER_TIMEOUT_S)
        with activity.step("pushing MNIST partitions to the nodes (POST /mocks job)"):
            rows = client.provide_mocks(dataset="mnist", tag="mnist")
        activity.print(f"pushed rows per node (tag 'mnist'): {rows}")
        hfl = {"mode": "hierarchical", "training_cycles": shape.cycles} if shape.cycles else {}
        sla = example_sla(
            shape.rounds,
            min_available_clients=per_cluster,
            min_fit_clients=per_cluster,
            min_evaluate_clients=per_cluster,
            **hfl,
        )
        project_id = client.create_project(sla)
        activity.print(f"project {project_id} accepted (repository {sla['ml_repo_url']})")
        return follow_project(activity, client, project_id, timeout_s)
