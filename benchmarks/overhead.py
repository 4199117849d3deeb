"""How much FLOps adds to federated training, measured side by side in one run.

Prints, for the example repository (``examples/mnist_sklearn``) on two local nodes with IID MNIST
partitions:

- the training-phase time of a FLOps project (``phases.training.seconds``: learners and aggregator
  started → last round aggregated, including process start-up, data loading, MQTT and MLflow
  logging of every round) next to the same training run as a plain Flower script
  (``plain_flower.py``: same environment, repository, partitions, rounds and clients; process
  start → server done), and their ratio (goal ≤ 1.10);
- POST → first aggregated round with a cold environment (empty cache: clone + uv build) and a warm
  one (cache hit).

The manager runs with its security controls on (the default: Flower with TLS and client tokens,
authenticated MQTT, Arrow Flight with TLS and tokens); ``--insecure flower`` (or any of
``mqtt,flower,data``, the manager's ``FLOPS_INSECURE``) turns controls off, so that two runs give
a control's cost (goal with every control on: ratio ≤ 1.15).

Usage: ``uv run python benchmarks/overhead.py [--rounds 5] [--repeats 3] [--insecure flower]``.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from flops_manager.auth import read_api_token
from flops_manager.client import ManagerClient
from flops_manager.config import ManagerConfig
from flops_manager.demo import EXAMPLE_REPO, example_sla, local_nodes
from flops_manager.suite import ManagerSuite
from flops_utils import env_vars
from flops_utils.net import find_free_port

PLAIN = Path(__file__).with_name("plain_flower.py")
TIMEOUT_S = 900


def flops_run(client: ManagerClient, sla: dict[str, Any]) -> tuple[float, float, dict[str, Any]]:
    """(POST → first round seconds, training-phase seconds, project) of one FLOps project."""
    posted = time.time()
    project_id = client.create_project(sla)
    project = client.wait_for_project(project_id, TIMEOUT_S, poll_s=0.1)
    if project["status"] != "completed":
        raise SystemExit(f"FLOps project failed: {project['status_message']}")
    first_round = min(e["timestamp"] for e in project["events"] if e["type"] == "round")
    return first_round - posted, project["phases"]["training"]["seconds"], project


def _data_access(node: Any) -> dict[str, str]:
    """The node owner's token and certificate for a plain client of a secure data server
    (``{}`` for a data server started ``--insecure``)."""
    from data_server.security import owner_credentials

    try:
        token, cert = owner_credentials(node.data_dir)
    except OSError:
        return {}
    return {env_vars.DATA_TOKEN: token, env_vars.DATA_SERVER_CERT: cert}


def plain_run(
    python: str, nodes: list[Any], rounds: int, repo: Path = EXAMPLE_REPO, tag: str = "mnist"
) -> float:
    """Seconds from starting the plain Flower server and clients (``python``, over ``repo``'s
    ModelManager, data tag ``tag``) to the server's end."""
    address = f"127.0.0.1:{find_free_port()}"
    env = {**os.environ, env_vars.ML_REPO_DIR: str(repo), env_vars.DATA_TAGS: tag}
    started = time.perf_counter()
    server = subprocess.Popen(
        [python, str(PLAIN), "server", address, str(rounds), str(len(nodes))],
        env=env,
        cwd=repo,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    clients = [
        subprocess.Popen(
            [python, str(PLAIN), "client", address],
            env={**env, env_vars.DATA_SERVER: node.location, **_data_access(node)},
            cwd=repo,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for node in nodes
    ]
    deadline = time.monotonic() + TIMEOUT_S
    while server.poll() is None:  # a client that dies leaves the server waiting: stop then
        if any(c.poll() not in (None, 0) for c in clients) or time.monotonic() > deadline:
            server.kill()
            raise SystemExit("the plain Flower baseline failed: a client ended early")
        time.sleep(0.05)
    elapsed = time.perf_counter() - started
    out = server.stdout.read() if server.stdout else ""
    for process in clients:
        process.wait(timeout=60)
    if server.returncode != 0 or "accuracy" not in out:
        raise SystemExit("the plain Flower baseline failed")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--insecure",
        default="",
        help="security controls to turn off, comma-separated: mqtt, flower, data",
    )
    args = parser.parse_args()
    insecure = frozenset(c.strip() for c in args.insecure.split(",") if c.strip())
    with tempfile.TemporaryDirectory(prefix="flops-bench-") as tmp:
        home = Path(tmp)
        with ManagerSuite(ManagerConfig(home=home, port=0, insecure=insecure)) as suite:
            token = read_api_token(home)
            client = ManagerClient(suite.url, token=token)
            secure_data = "data" not in insecure
            with local_nodes(2, home / "nodes", suite.url, token, secure=secure_data) as nodes:
                client.wait_for_nodes(2, timeout_s=30)
                client.provide_mocks(dataset="mnist", tag="mnist")
                sla = example_sla(
                    args.rounds,
                    min_available_clients=2,
                    min_fit_clients=2,
                    min_evaluate_clients=2,
                )
                cold_latency, _, project = flops_run(client, sla)
                python = project["admin"]["environment_paths"]["python"]
                warm_latency, flops_training, plain = [], [], []
                for _ in range(args.repeats):
                    latency, training, _ = flops_run(client, sla)
                    warm_latency.append(latency)
                    flops_training.append(training)
                    plain.append(plain_run(python, nodes, args.rounds))
    median_flops, median_plain = statistics.median(flops_training), statistics.median(plain)
    print(f"example mnist_sklearn, 2 learners, {args.rounds} rounds, {args.repeats} repeats")
    print(f"security controls off: {', '.join(sorted(insecure)) or 'none'}")
    print(f"{'':34}{'FLOps':>10}{'plain Flower':>14}{'ratio':>8}")
    print(
        f"{'training phase, median (s)':34}{median_flops:>10.2f}{median_plain:>14.2f}"
        f"{median_flops / median_plain:>8.2f}"
    )
    print(f"{'POST → first round, cold env (s)':34}{cold_latency:>10.2f}")
    print(f"{'POST → first round, warm env (s)':34}{statistics.median(warm_latency):>10.2f}")
    print(f"cold / warm latency ratio: {cold_latency / statistics.median(warm_latency):.1f}")


if __name__ == "__main__":
    sys.exit(main())
