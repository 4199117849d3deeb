"""Load on the manager's REST API next to a minimal Flask + waitress app, in one run.

Both servers run as their own processes on loopback; 32 client threads (keep-alive
connections) send requests for a fixed time per scenario. Scenarios:

- ``GET /api/flops/projects/{id}`` of one stored project (with its event log);
- ``GET /api/flops/projects`` (first page of 50) with 1000 stored projects;
- ``POST /api/flops/projects`` with an invalid SLA (rejected with 422);
- ``GET /api/flops/projects/{id}`` again while ``FOLLOWERS`` clients follow the event stream
  of a project that is building (its repository on a local git server that never answers),
  FLOps only (the baseline has no event stream). Goal: p99 ≤ 100 ms with 100 followers.

The baseline serves the same JSON bodies from memory with no validation, auth or store. Prints
requests/s, p50 and p99 latency (ms) for both and the ratio of throughputs. Goal: p99 ≤ 50 ms at
32 concurrent clients on a 2-core machine.

Usage: ``uv run python benchmarks/api_load.py [--clients 32] [--seconds 5]``.
"""

import argparse
import contextlib
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from flops_manager.auth import load_or_create_api_token
from flops_manager.records import Event, Phase, ProjectRecord, RoundMetrics
from flops_manager.store import open_store
from flops_utils.contract.lifecycle import ProjectStatus
from flops_utils.net import find_free_port, wait_for_port
from flops_utils.processes import stop_process_groups

FOLLOWERS = 100
PROJECTS = 1000
EVENTS_PER_PROJECT = 12
INVALID_SLA = json.dumps({"ml_repo_url": "x", "training_configuration": {"training_rounds": 0}})

BASELINE_APP = """
import json, sys
from flask import Flask, Response
import waitress

project, page, error = (open(p).read() for p in sys.argv[2:5])
app = Flask(__name__)

@app.get("/api/flops/projects/<project_id>")
def one(project_id):
    return Response(project, mimetype="application/json")

@app.get("/api/flops/projects")
def many():
    return Response(page, mimetype="application/json")

@app.post("/api/flops/projects")
def reject():
    return Response(error, status=422, mimetype="application/json")

waitress.serve(app, host="127.0.0.1", port=int(sys.argv[1]), threads=16, _quiet=True)
"""


def fill_store(home: Path) -> str:
    """Store ``PROJECTS`` finished projects; returns the id of the last one."""
    store = open_store(str(home / "db"))
    now = time.time()
    project_id = ""
    for index in range(PROJECTS):
        project_id = f"bench{index:07d}"
        events = [
            Event(timestamp=now, type="status", status="training", message=f"event {n}")
            for n in range(EVENTS_PER_PROJECT)
        ]
        store.insert_project(
            ProjectRecord(
                _id=project_id,
                project_id=project_id,
                customer_id="Admin",
                status=ProjectStatus.COMPLETED,
                status_message="final accuracy 0.9170",
                created_at=now + index,
                updated_at=now + index,
                sla={"ml_repo_url": "https://example.org/repo.git"},
                phases={"training": Phase(started_at=now, ended_at=now + 9, seconds=9.0)},
                events=events,
                rounds=[RoundMetrics(round=r, loss=0.3, accuracy=0.9) for r in range(1, 6)],
            )
        )
    store.close()
    return project_id


def silent_git_server() -> tuple[str, socket.socket]:
    """A git URL on a loopback server that accepts connections and never answers (a build
    from it stays in ``building`` until git's low-speed limit, 30 s); close the socket to
    stop it."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                held.append(server.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    return f"http://127.0.0.1:{server.getsockname()[1]}/silent.git", server


def follow(port: int, path: str, token: str, stop: threading.Event) -> int:
    """Follow the event stream at ``path`` until ``stop``; returns the HTTP status."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("GET", path, headers={"Authorization": f"Bearer {token}"})
    response = connection.getresponse()
    if response.status == 200:

        def close_when_stopped() -> None:
            stop.wait()
            connection.close()

        threading.Thread(target=close_when_stopped, daemon=True).start()
    else:
        response.read()
        connection.close()
    return response.status


def with_followers(
    port: int, token: str, path: str, seconds: float
) -> tuple[dict[str, float], int]:
    """``load`` of ``GET path`` by 32 clients while ``FOLLOWERS`` clients follow the events
    of a project building from a silent git server; returns the load and how many followers
    were accepted (the rest got 429)."""
    url, server = silent_git_server()
    sla = json.dumps(
        {"ml_repo_url": url, "ml_model_flavor": "sklearn", "training_configuration": {}}
    )
    node = json.dumps(
        {"node_id": "bench-node", "data_server": "grpc://127.0.0.1:9", "tags": {"mnist": 9}}
    )
    fetch(port, "POST", "/api/flops/nodes", token, node)
    building = json.loads(fetch(port, "POST", "/api/flops/projects", token, sla))["project_id"]
    stop = threading.Event()
    statuses: list[int] = []
    events = f"/api/flops/projects/{building}/events?follow=1"
    workers = [
        threading.Thread(target=lambda: statuses.append(follow(port, events, token, stop)))
        for _ in range(FOLLOWERS)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    try:
        measured = load(port, "GET", path, None, token, 32, seconds)
    finally:
        stop.set()
        server.close()
    return measured, statuses.count(200)


def start(command: list[str], env: dict[str, str], port: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    if not wait_for_port("127.0.0.1", port, 120):
        stop_process_groups([process])
        raise SystemExit(f"{command[0]} did not listen on {port}")
    return process


def fetch(port: int, method: str, path: str, token: str, body: str | None = None) -> bytes:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    connection.request(method, path, body=body, headers=headers)
    data = connection.getresponse().read()
    connection.close()
    return data


def load(
    port: int, method: str, path: str, body: str | None, token: str, clients: int, seconds: float
) -> dict[str, float]:
    """Requests/s and p50/p99 latency (ms) of ``clients`` threads for ``seconds``."""
    latencies: list[float] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        mine = []
        while time.perf_counter() < deadline:
            began = time.perf_counter()
            connection.request(method, path, body=body, headers=headers)
            connection.getresponse().read()
            mine.append(time.perf_counter() - began)
        connection.close()
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    ordered = sorted(latencies)
    return {
        "rps": len(ordered) / elapsed,
        "p50": statistics.median(ordered) * 1000,
        "p99": ordered[int(len(ordered) * 0.99) - 1] * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="flops-api-load-") as tmp:
        home = Path(tmp)
        project_id = fill_store(home)
        token = load_or_create_api_token(home)
        manager_port, baseline_port = find_free_port(), find_free_port()
        env = {
            **os.environ,
            "FLOPS_HOME": str(home),
            "FLOPS_MANAGER_PORT": str(manager_port),
            "FLOPS_MLFLOW_URL": "http://127.0.0.1:9",
            "FLOPS_LOG_LEVEL": "WARNING",
        }
        manager = start([sys.executable, "-m", "flops_manager.main"], env, manager_port)
        scenarios = [
            ("GET /projects/{id}", "GET", f"/api/flops/projects/{project_id}", None),
            (f"GET /projects ({PROJECTS} stored)", "GET", "/api/flops/projects", None),
            ("POST /projects rejected", "POST", "/api/flops/projects", INVALID_SLA),
        ]
        bodies = [fetch(manager_port, m, p, token, b) for _, m, p, b in scenarios]
        for index, answer in enumerate(bodies):
            (home / f"body{index}.json").write_bytes(answer)
        baseline = start(
            [sys.executable, "-c", BASELINE_APP, str(baseline_port)]
            + [str(home / f"body{i}.json") for i in range(3)],
            env,
            baseline_port,
        )
        results = []
        try:
            for name, method, path, body in scenarios:
                ours = load(manager_port, method, path, body, token, args.clients, args.seconds)
                base = load(baseline_port, method, path, body, token, args.clients, args.seconds)
                results.append((name, ours, base))
            followed, accepted = with_followers(manager_port, token, scenarios[0][2], args.seconds)
        finally:
            stop_process_groups([manager, baseline])
    print(f"{args.clients} concurrent clients, {args.seconds:g} s per scenario and server")
    print(
        f"{'':30}{'FLOps req/s':>12}{'p50 ms':>8}{'p99 ms':>8}"
        f"{'Flask req/s':>13}{'p50 ms':>8}{'p99 ms':>8}{'ratio':>7}"
    )
    for name, ours, base in results:
        print(
            f"{name:30}{ours['rps']:>12.0f}{ours['p50']:>8.1f}{ours['p99']:>8.1f}"
            f"{base['rps']:>13.0f}{base['p50']:>8.1f}{base['p99']:>8.1f}"
            f"{ours['rps'] / base['rps']:>7.2f}"
        )
    alone = results[0][1]
    print(
        f"\nGET /projects/{{id}} while {accepted} of {FOLLOWERS} clients follow an event stream: "
        f"{followed['rps']:.0f} req/s, p50 {followed['p50']:.1f} ms, p99 {followed['p99']:.1f} ms "
        f"(without followers: p99 {alone['p99']:.1f} ms; "
        f"ratio {followed['p99'] / alone['p99']:.2f})"
    )


if __name__ == "__main__":
    main()
