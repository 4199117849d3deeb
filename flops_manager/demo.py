"""The main job (``flops demo``): a real FL project from SLA to trained model on this machine.

It starts the embedded suite (manager, store, Mosquitto, MLflow), two worker nodes (one
``flops-data-server`` process each), pushes MNIST partitions to them through ``POST /mocks``,
POSTs the example SLA over HTTP and follows the project until it ends.
"""

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import requests

from flops_manager.client import ManagerClient
from flops_utils import env_vars
from flops_utils.net import find_free_port, wait_for_port
from flops_utils.processes import stop_process_groups

if TYPE_CHECKING:
    from flops_utils.data_client import DataClient

SOURCE_ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_REPO = SOURCE_ROOT / "examples" / "mnist_sklearn"
NODE_START_TIMEOUT_S = 30.0
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
                    env={**os.environ, env_vars.MANAGER_TOKEN: credential},
                    start_new_session=True,
                )
            )
            log.close()
            nodes.append(LocalNode(node_id, data_dir, f"grpc://127.0.0.1:{port}"))
        for node in nodes:
            port = int(node.location.rsplit(":", 1)[1])
            if not wait_for_port("127.0.0.1", port, NODE_START_TIMEOUT_S):
                raise TimeoutError(f"data server of {node.node_id} did not start; see its log")
        yield nodes
    finally:
        stop_process_groups(processes, NODE_STOP_TIMEOUT_S)


def node_credential(manager_url: str, admin_token: str, node_id: str) -> str:
    """A node credential for ``node_id`` issued by the manager at ``manager_url`` with the
    admin's ``admin_token``. Raises ``requests.HTTPError`` when the manager refuses."""
    response = requests.post(
        f"{manager_url}/api/flops/nodes/{node_id}/credential",
        headers={"Authorization": f"Bearer {admin_token}"},
        timeout=30,
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
