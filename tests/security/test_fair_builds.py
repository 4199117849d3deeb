"""Builds are shared fairly (issue: secure by default, attack 6): one customer's slow
repositories (a tarpit git server) cannot hold every build worker while another customer's
project waits."""

import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from mqtt_testing import manager_mqtt
from tarpit_testing import tarpit_server
from waiting import wait_until

from flops_manager.broker import MosquittoBroker
from flops_manager.config import ManagerConfig
from flops_manager.lifecycle.scheduling import FairQueue
from flops_manager.suite import ManagerSuite


def test_one_customer_cannot_take_every_worker() -> None:
    release = threading.Event()
    started: list[str] = []
    queue = FairQueue(workers=3, per_customer=2)

    def job(name: str) -> None:
        started.append(name)
        release.wait(10)

    for index in range(4):
        queue.submit("alice", partial(job, f"alice-{index}"))
    queue.submit("bob", partial(job, "bob-0"))
    wait_until(lambda: len(started) == 3, 5, "three jobs did not start")

    assert sorted(started) == ["alice-0", "alice-1", "bob-0"]
    assert queue.running("alice") == 2 and queue.waiting("alice") == 2
    release.set()
    wait_until(lambda: len(started) == 5, 5, "the waiting jobs did not start")
    queue.close()


def test_free_workers_go_to_customers_in_turn() -> None:
    gate = threading.Semaphore(0)
    order: list[str] = []
    queue = FairQueue(workers=1, per_customer=1)

    def job(customer: str) -> None:
        order.append(customer)
        gate.acquire()

    queue.submit("first", partial(gate.acquire))  # holds the only worker
    for customer in ("alice", "alice", "alice", "bob", "carol"):
        queue.submit(customer, partial(job, customer))

    for _ in range(6):
        gate.release()
    wait_until(lambda: len(order) == 5, 5, "the queued jobs did not run")

    assert order[:3] == ["alice", "bob", "carol"]
    queue.close()


@pytest.fixture
def tarpit() -> Iterator[str]:
    with tarpit_server() as url:
        yield url


def _token(key: rsa.RSAPrivateKey, customer: str, roles: list[str]) -> dict[str, str]:
    now = int(time.time())
    claims = {"sub": customer, "roles": roles, "type": "access", "iat": now, "exp": now + 600}
    return {"Authorization": f"Bearer {jwt.encode(claims, key, algorithm='RS256')}"}


def _sla(customer: str, url: str) -> dict[str, Any]:
    return {
        "customerID": customer,
        "ml_repo_url": url,
        "ml_model_flavor": "sklearn",
        "training_configuration": {"data_tags": ["mnist"]},
    }


def test_a_tarpit_customer_does_not_stall_another_customers_build(
    tmp_path: Path, mqtt_broker: MosquittoBroker, tarpit: str
) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = tmp_path / "oakestra.pem"
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    config = ManagerConfig(
        home=tmp_path / "home",
        port=0,
        **manager_mqtt(mqtt_broker),
        mlflow_url="http://127.0.0.1:9",
        auth="oakestra",
        insecure=frozenset({"local", "mlflow"}),  # many customers, local; MLflow without auth
        jwt_public_key_file=str(public),
    )
    with ManagerSuite(config) as suite:
        api = f"{suite.url}/api/flops"
        admin = _token(key, "Admin", ["ADMIN"])
        node = {"node_id": "edge-1", "data_server": "grpc://127.0.0.1:9999", "tags": {"mnist": 5}}
        assert requests.post(f"{api}/nodes", json=node, headers=admin, timeout=10).ok
        mallory = _token(key, "mallory", ["USER"])
        for index in range(6):  # more slow builds than there are build workers
            slow = _sla("mallory", f"{tarpit}/slow-{index}.git")
            assert requests.post(f"{api}/projects", json=slow, headers=mallory, timeout=10).ok
        bob = _token(key, "bob", ["USER"])
        quick = _sla("bob", "https://127.0.0.1:9/unreachable.git")  # fails at once

        created = requests.post(f"{api}/projects", json=quick, headers=bob, timeout=10)
        project_id = created.json()["project_id"]

        def ended() -> dict[str, Any] | None:
            answer = requests.get(f"{api}/projects/{project_id}", headers=bob, timeout=10)
            project: dict[str, Any] = answer.json()
            return project if project["status"] == "failed" else None

        # the tarpit holds a fetch for 30 s (git's low-speed limit); bob's build must not wait
        wait_until(ended, 20, "bob's build waited behind mallory's slow builds")
        queue = suite.lifecycle.builds
        assert queue.running("mallory") == queue.per_customer
