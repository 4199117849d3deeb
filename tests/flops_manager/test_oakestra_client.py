"""The Oakestra client against the Oakestra double (a real process on loopback) that runs
the deployed images with buildah, and the ``oakestra`` orchestrator on a double that runs
them as host processes."""

import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from oakestra_double import OakestraDouble, WorkerSpec
from oakestra_double.worker import ARCH_ALIASES

from flops_manager.errors import (
    OakestraAuthFailed,
    OakestraConflict,
    OakestraError,
    OakestraNotFound,
    OakestraUnavailable,
)
from flops_manager.orchestrators.base import Deployment, Placement, ServiceSpec
from flops_manager.orchestrators.oakestra import OakestraOrchestrator, exit_of
from flops_manager.orchestrators.oakestra_client import (
    JWT_REJECTIONS,
    NAME_PATTERN,
    TERMINAL_STATUSES,
    OakestraClient,
    application,
    microservice,
    oakestra_name,
)
from flops_utils.contract.exit_codes import UNKNOWN_EXIT
from flops_utils.net import find_free_port

PROGRESSION = ["REQUESTED", "CLUSTER_SCHEDULED", "NODE_SCHEDULED", "RUNNING"]
WAITING = "Waiting for scheduling decision"
"""The job-level ``status_detail``, whatever happens to the instances."""
HOST_ARCH = ARCH_ALIASES.get(platform.machine(), platform.machine())
OTHER_ARCH = "arm64" if HOST_ARCH == "amd64" else "amd64"
WORKERS = (WorkerSpec("cluster1", "worker1"), WorkerSpec("cluster2", "worker2"))


def wait_for(condition: Callable[[], Any], timeout_s: float, interval_s: float = 0.1) -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval_s)
    pytest.fail(f"condition not met within {timeout_s}s")


def delta(before: dict[str, int], after: dict[str, int], key: str) -> int:
    return after.get(key, 0) - before.get(key, 0)


@pytest.fixture(scope="module")
def double(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OakestraDouble]:
    """A double with two clusters of one worker each, statuses reported 0.2 s late."""
    with OakestraDouble(tmp_path_factory.mktemp("oakestra"), workers=WORKERS) as running:
        yield running


@pytest.fixture
def client(double: OakestraDouble) -> Iterator[OakestraClient]:
    oakestra = OakestraClient(double.url, "Admin", "Admin", timeout_s=5, backoff_s=0.05)
    yield oakestra
    for app in oakestra.list_applications():
        oakestra.delete_application(app["applicationID"])
    oakestra.close()


def new_app(client: OakestraClient, *parts: str) -> str:
    return client.create_application(application(oakestra_name("test", *parts), "flops"))


# ---- names and SLA builders ----------------------------------------------------------------


def test_oakestra_names_are_valid_deterministic_and_distinct() -> None:
    names = {oakestra_name("learner", "project-1", f"node-{i}") for i in range(1000)}

    assert len(names) == 1000
    assert all(NAME_PATTERN.match(name) for name in names)
    assert oakestra_name("learner", "p", "n") == oakestra_name("learner", "p", "n")
    assert oakestra_name("learner", "p", "n").startswith("learner")
    assert NAME_PATTERN.match(oakestra_name("a-very-long-role-name-with-dashes-and-more", "p"))
    with pytest.raises(ValueError):
        oakestra_name()


def test_an_instance_that_ended_without_an_exit_code_is_not_given_one() -> None:
    dead = exit_of("DEAD", "container stopped")
    dead_with_code = exit_of("DEAD", "exited with code 137")
    failed = exit_of("FAILED", "image pull failed")

    assert dead.returncode == UNKNOWN_EXIT and "DEAD (it crashed)" in dead.last_line
    assert dead_with_code.returncode == 137
    assert failed.returncode == UNKNOWN_EXIT and "could not start" in failed.last_line
    assert exit_of("COMPLETED", "").returncode == 0


def test_microservice_builder_makes_the_sla_fields() -> None:
    service = microservice(
        "learner1",
        "flops",
        "127.0.0.1:5000/flops/learner:1",
        cmd=["python3", "-m", "learner"],
        env={"FLOPS_PROJECT_ID": "p1", "A": "b=c"},
        memory_mb=512,
        vcpus=2,
        storage_mb=1024,
        port=8080,
        cluster="cluster1",
        node="worker1",
        platform="linux/arm64",
    )

    assert service["virtualization"] == "container"
    assert service["code"] == "127.0.0.1:5000/flops/learner:1"
    assert service["environment"] == ["FLOPS_PROJECT_ID=p1", "A=b=c"]
    assert (service["memory"], service["vcpus"], service["storage"]) == (512, 2, 1024)
    assert service["port"] == "8080"
    assert service["constraints"] == [{"type": "direct", "cluster": "cluster1", "node": "worker1"}]
    assert service["platform"] == "linux/arm64"
    with pytest.raises(ValueError, match="letters or digits"):
        microservice("learner-1", "flops", "image")
    with pytest.raises(ValueError, match="both cluster and node"):
        microservice("learner1", "flops", "image", cluster="cluster1")
    with pytest.raises(ValueError, match="memory_mb"):
        microservice("learner1", "flops", "image", memory_mb=1.5)  # type: ignore[arg-type]


# ---- authentication ------------------------------------------------------------------------


def test_active_clusters_need_no_login(double: OakestraDouble) -> None:
    before = double.stats()
    oakestra = OakestraClient(double.url, "Admin", "wrong password")

    clusters = oakestra.active_clusters()

    assert sorted(c["cluster_name"] for c in clusters) == ["cluster1", "cluster2"]
    assert all(c["_id"] and c["active"] for c in clusters)
    raw = requests.get(f"{double.url}/api/clusters/active", timeout=5).json()
    assert all(isinstance(c["_id"], str) for c in raw)  # a plain string, not {"$oid"}
    assert [(c["active_nodes"], c["vcpus"], c["memory"]) for c in raw] == [(1, 8, 16384)] * 2
    assert delta(before, double.stats(), "logins") == 0


def test_wrong_password_is_a_clear_auth_error(double: OakestraDouble) -> None:
    oakestra = OakestraClient(double.url, "Admin", "wrong password", backoff_s=0.01)

    with pytest.raises(OakestraAuthFailed, match=r"'Admin'.*username and password") as error:
        oakestra.list_applications()

    assert error.value.status == 401


def test_access_token_is_renewed_before_it_expires(tmp_path: Path) -> None:
    skew_s = [0.0]  # the client's clock runs this far ahead of the double's
    with OakestraDouble(tmp_path, access_token_lifetime_s=60.0) as short_lived:
        oakestra = OakestraClient(
            short_lived.url, "Admin", "Admin", clock=lambda: time.time() + skew_s[0]
        )
        assert oakestra.list_applications() == []

        skew_s[0] = 59.0  # for the client, the first access token expires in about a second
        app_id = oakestra.create_application(application("afterexpiry", "flops"))

        assert [a["applicationID"] for a in oakestra.list_applications()] == [app_id]
        stats = short_lived.stats()
        assert stats.get("logins") == 1
        assert stats.get("refreshes", 0) >= 1
        assert stats.get("unauthorized", 0) == 0  # renewed in time, never refused


def test_a_refused_access_token_is_refreshed_and_the_request_repeated(
    double: OakestraDouble, client: OakestraClient
) -> None:
    app_id = new_app(client, "refused")
    before = double.stats()
    double.revoke_tokens(access=True)

    assert client.find_application(oakestra_name("test", "refused"), "flops") is not None

    after = double.stats()
    assert delta(before, after, "unauthorized") == 1
    assert delta(before, after, "refreshes") == 1
    assert delta(before, after, "logins") == 0
    assert client.delete_application(app_id)


def test_a_refused_refresh_token_leads_to_a_new_login(
    double: OakestraDouble, client: OakestraClient
) -> None:
    client.list_applications()
    before = double.stats()
    double.revoke_tokens(access=True, refresh=True)

    assert client.list_applications() == []

    after = double.stats()
    assert delta(before, after, "unauthorized") == 2  # the API call, then the refresh
    assert delta(before, after, "logins") == 1


def test_after_a_root_restart_the_client_logs_in_again_and_repeats_the_request(
    double: OakestraDouble, client: OakestraClient
) -> None:
    app_id = new_app(client, "rotation")
    client.list_applications()  # the user id is known: only application routes follow
    token = client._access_header()
    double.rotate_keys()  # the jwt-generator's new key pair after a root restart
    stale = requests.get(f"{double.url}/api/applications/x", headers=token, timeout=5)
    before = double.stats()

    found = client.find_application(oakestra_name("test", "rotation"), "flops")
    service_id = client.create_service(app_id, microservice("svc", "flops", "image"))

    assert stale.status_code == 422
    assert stale.json()["msg"].startswith(JWT_REJECTIONS)
    assert found is not None and found["applicationID"] == app_id
    assert client.get_service(service_id)["microservice_name"] == "svc"
    after = double.stats()
    assert delta(before, after, "logins") == 1  # once, on the first 422
    assert delta(before, after, "unauthorized") == 0


def test_the_client_logs_in_to_its_organization(tmp_path: Path) -> None:
    with OakestraDouble(tmp_path, organizations=("root", "lab")) as running:
        lab = OakestraClient(running.url, "Admin", "Admin", organization="lab")
        nowhere = OakestraClient(running.url, "Admin", "Admin", organization="nowhere")
        empty = requests.post(f"{running.url}/api/auth/login", json={}, timeout=5)

        assert lab.list_applications() == []
        with pytest.raises(OakestraAuthFailed, match="no organization 'nowhere'") as error:
            nowhere.list_applications()

    assert error.value.status == 404
    assert empty.status_code == 500
    assert empty.json() == {"code": 500, "status": "Internal Server Error"}


# ---- applications --------------------------------------------------------------------------


def test_create_find_and_delete_an_application(client: OakestraClient) -> None:
    name = oakestra_name("test", "lifecycle")

    app_id = client.create_application(application(name, "flops", description="a project"))

    found = client.find_application(name, "flops")
    assert found is not None
    assert found["applicationID"] == app_id
    assert found["application_desc"] == "a project"
    assert found["microservices"] == []
    assert client.delete_application(app_id) is True
    assert client.find_application(name, "flops") is None
    assert client.delete_application(app_id) is False


def test_a_duplicate_application_is_a_conflict(client: OakestraClient) -> None:
    name = oakestra_name("test", "duplicate")
    client.create_application(application(name, "flops"))

    with pytest.raises(OakestraConflict, match=f"{name}.*another name") as error:
        client.create_application(application(name, "flops"))

    assert error.value.status == 409
    assert json.loads(error.value.body) == {"code": 409, "status": "Conflict"}


def test_an_application_with_a_bad_name_is_refused_by_oakestra(client: OakestraClient) -> None:
    bad = {"application_name": "no-dashes", "application_namespace": "flops"}

    with pytest.raises(OakestraError) as error:
        client.create_application(bad)

    assert error.value.status == 422
    assert "(422: Unprocessable Entity)" in error.value.message


def test_the_double_answers_with_oakestras_quirks(
    double: OakestraDouble, client: OakestraClient
) -> None:
    token = requests.post(
        f"{double.url}/api/auth/login", json={"username": "Admin", "password": "Admin"}, timeout=5
    ).json()["token"]
    headers = {"Authorization": f"Bearer {token}"}
    sla = {
        "sla_version": "v2.0",
        "customerID": "Admin",
        "applications": [application("quirks", "flops")],
    }

    created = requests.post(f"{double.url}/api/application/", json=sla, headers=headers, timeout=5)
    apps = json.loads(created.json())  # a JSON string that encodes the list
    app_id = next(a["applicationID"] for a in apps if a["application_name"] == "quirks")
    got = requests.get(f"{double.url}/api/application/{app_id}", headers=headers, timeout=5)
    service_id = client.create_service(app_id, microservice("svc", "flops", "image"))
    service = requests.get(f"{double.url}/api/service/{service_id}", headers=headers, timeout=5)
    old_version = dict(sla, sla_version="v1.0")
    refused = requests.post(
        f"{double.url}/api/application/", json=old_version, headers=headers, timeout=5
    )
    no_token = requests.get(f"{double.url}/api/service/{service_id}", timeout=5)

    assert created.status_code == 200 and isinstance(created.json(), str)
    assert got.status_code == 200 and got.json() is None
    assert isinstance(service.json(), str)
    assert json.loads(service.json())["_id"] == {"$oid": service_id}
    assert refused.status_code == 400
    assert refused.json() == {"code": 400, "status": "Bad Request"}  # no message
    assert no_token.status_code == 401
    assert no_token.json() == {"message": "Missing authentication token"}


# ---- services ------------------------------------------------------------------------------


def test_a_service_with_a_bad_name_carries_oakestras_400_body(client: OakestraClient) -> None:
    app_id = new_app(client, "badservice")
    service = microservice("svc", "flops", "image")
    service["microservice_name"] = "bad_name"

    with pytest.raises(OakestraError, match=r"'bad_name'.*400") as error:
        client.create_service(app_id, service)

    assert error.value.status == 400
    assert json.loads(error.value.body) == {"code": 400, "status": "Bad Request"}


def test_a_service_with_a_non_integer_resource_is_refused(client: OakestraClient) -> None:
    app_id = new_app(client, "badmemory")
    service = microservice("svc", "flops", "image")
    service["memory"] = "512"

    with pytest.raises(OakestraError) as error:
        client.create_service(app_id, service)

    assert error.value.status == 400


def test_failed_services_are_raised_with_oakestras_reason(client: OakestraClient) -> None:
    app_id = new_app(client, "failedservice")
    client.create_service(app_id, microservice("first", "flops", "image", rr_ip="10.30.0.7"))

    with pytest.raises(OakestraError, match=r"'second'.*10\.30\.0\.7 is already assigned") as error:
        client.create_service(app_id, microservice("second", "flops", "image", rr_ip="10.30.0.7"))
    with pytest.raises(OakestraError, match="outside the service network"):
        client.create_service(app_id, microservice("third", "flops", "image", rr_ip="10.1.0.1"))

    assert error.value.details == [
        {
            "service_name": "second",
            "message": "failed to deploy service: service IP 10.30.0.7 is already assigned",
            "status": 500,
        }
    ]
    app = client.find_application(oakestra_name("test", "failedservice"), "flops")
    assert app is not None and len(app["microservices"]) == 1


def test_services_of_unknown_applications_and_unknown_services(client: OakestraClient) -> None:
    with pytest.raises(OakestraNotFound, match="no application"):
        client.create_service("0" * 24, microservice("svc", "flops", "image"))
    with pytest.raises(OakestraNotFound) as error:
        client.get_service("0" * 24)

    assert error.value.status == 404
    assert client.delete_service("0" * 24) is False


def test_deleting_a_service_that_is_gone_is_false_at_once(
    double: OakestraDouble, client: OakestraClient
) -> None:
    app_id = new_app(client, "gone")
    service_id = client.create_service(app_id, microservice("svc", "flops", "image"))
    assert client.delete_service(service_id) is True
    token = client._access_header()
    before = double.stats()

    assert client.delete_service(service_id) is False

    assert delta(before, double.stats(), "requests") == 1  # a 500, not retried
    raw = requests.delete(f"{double.url}/api/service/{service_id}", headers=token, timeout=5)
    assert (raw.status_code, raw.json()) == (500, {"code": 500, "status": "Internal Server Error"})


def test_a_slow_delete_that_deleted_is_not_an_error(double: OakestraDouble) -> None:
    oakestra = OakestraClient(double.url, "Admin", "Admin", timeout_s=0.5, backoff_s=0.05)
    app_id = new_app(oakestra, "slowdelete")
    double.inject_faults(4, status=0, delay_s=1.0, after=True)  # each answer comes too late

    assert oakestra.delete_application(app_id) is True

    assert oakestra.find_application(oakestra_name("test", "slowdelete"), "flops") is None


def test_all_services_of_an_application_in_one_request(
    double: OakestraDouble, client: OakestraClient
) -> None:
    app_id = new_app(client, "bulk")
    services = [
        client.create_service(app_id, microservice(f"svc{i}", "flops", "image")) for i in range(3)
    ]
    before = double.stats()

    jobs = client.list_services(app_id)

    assert [j["_id"] for j in jobs] == services
    assert [j["microservice_name"] for j in jobs] == ["svc0", "svc1", "svc2"]
    assert delta(before, double.stats(), "requests") == 1
    with pytest.raises(OakestraNotFound):
        client.list_services("0" * 24)


def test_deleting_an_application_deletes_its_services(client: OakestraClient) -> None:
    app_id = new_app(client, "cascade")
    services = [
        client.create_service(app_id, microservice(f"svc{i}", "flops", "image")) for i in range(2)
    ]
    assert [client.get_service(s)["microservice_name"] for s in services] == ["svc0", "svc1"]

    assert client.delete_application(app_id)

    for service_id in services:
        with pytest.raises(OakestraNotFound):
            client.get_service(service_id)
        assert client.delete_service(service_id) is False


def test_deleting_a_service_detaches_it_from_its_application(client: OakestraClient) -> None:
    app_id = new_app(client, "detach")
    service_id = client.create_service(app_id, microservice("svc", "flops", "image"))

    assert client.delete_service(service_id) is True

    app = client.find_application(oakestra_name("test", "detach"), "flops")
    assert app is not None and app["microservices"] == []


# ---- scheduling without running anything ----------------------------------------------------


def test_an_unknown_target_cluster_fails_the_scheduling(client: OakestraClient) -> None:
    app_id = new_app(client, "nocluster")
    service_id = client.create_service(
        app_id, microservice("svc", "flops", "image", cluster="nowhere", node="worker1")
    )

    client.deploy_instance(service_id)

    service = wait_for(
        lambda: (s := client.get_service(service_id))["status"] in TERMINAL_STATUSES and s, 10
    )
    assert service["status"] == "TargetClusterNotActive"
    assert service["status_detail"] == WAITING
    assert service["instance_list"] == []


def test_too_many_resources_fail_the_scheduling(client: OakestraClient) -> None:
    app_id = new_app(client, "toobig")
    service_id = client.create_service(
        app_id, microservice("svc", "flops", "image", vcpus=9, cluster="cluster1", node="worker1")
    )

    client.deploy_instance(service_id)

    service = wait_for(
        lambda: (s := client.get_service(service_id))["status"] in TERMINAL_STATUSES and s, 10
    )
    assert service["status"] == "NoActiveClusterWithCapacity"
    assert service["instance_list"] == []


def test_an_unknown_target_node_leaves_the_instance_cluster_scheduled(
    client: OakestraClient,
) -> None:
    app_id = new_app(client, "nonode")
    service_id = client.create_service(
        app_id, microservice("svc", "flops", "image", cluster="cluster2", node="nobody")
    )

    client.deploy_instance(service_id)
    wait_for(lambda: client.get_service(service_id)["instance_list"], 10)
    time.sleep(1.0)  # five report delays: nothing ever reports on it

    service = client.get_service(service_id)
    (instance,) = service["instance_list"]
    cluster2 = next(c for c in client.active_clusters() if c["cluster_name"] == "cluster2")
    assert instance["status"] == "CLUSTER_SCHEDULED"
    assert instance["cluster_id"] == cluster2["_id"]
    assert service["status_detail"] == WAITING


def test_a_platform_the_worker_lacks_fails_the_instance(client: OakestraClient) -> None:
    app_id = new_app(client, "platform")
    service_id = client.create_service(
        app_id,
        microservice(
            "svc", "flops", "image", cluster="cluster1", node="worker1",
            platform=f"linux/{OTHER_ARCH}",
        ),
    )  # fmt: skip

    client.deploy_instance(service_id)

    instance = wait_for(lambda: terminal_instance(client, service_id), 10)
    assert instance["status"] == "FAILED"
    assert f"platform linux/{OTHER_ARCH}" in instance["status_detail"]


def status_of(client: OakestraClient, service_id: str) -> str:
    """The status of the service's first instance, or the service's before it has one."""
    service = client.get_service(service_id)
    return str((service["instance_list"] or [service])[0]["status"])


def terminal_instance(client: OakestraClient, service_id: str) -> dict[str, Any] | None:
    """The service's first instance once its status is terminal."""
    instances = client.get_service(service_id)["instance_list"]
    if instances and instances[0].get("status") in TERMINAL_STATUSES:
        instance: dict[str, Any] = instances[0]
        return instance
    return None


# ---- retries -------------------------------------------------------------------------------


def test_5xx_answers_are_retried(double: OakestraDouble, client: OakestraClient) -> None:
    client.list_applications()
    before = double.stats()
    double.inject_faults(2, status=503)

    assert client.list_applications() == []

    assert delta(before, double.stats(), "requests") == 3  # GET /api/applications/<id> x3


def test_5xx_answers_that_persist_are_a_clear_error(
    double: OakestraDouble, client: OakestraClient
) -> None:
    client.list_applications()
    double.inject_faults(4, status=500)

    with pytest.raises(OakestraUnavailable, match=r"after 4 attempts.*HTTP 500") as error:
        client.list_applications()

    assert error.value.status == 500
    assert json.loads(error.value.body) == {"code": 500, "status": "Internal Server Error"}


def test_4xx_answers_are_not_retried(double: OakestraDouble, client: OakestraClient) -> None:
    app_id = new_app(client, "noretry")
    before = double.stats()

    with pytest.raises(OakestraError):
        client.create_service(app_id, microservice("svc", "flops", "image") | {"vcpus": "1"})

    assert delta(before, double.stats(), "requests") == 1


def test_a_slow_answer_times_out_and_is_retried(double: OakestraDouble) -> None:
    oakestra = OakestraClient(double.url, "Admin", "Admin", timeout_s=0.5, backoff_s=0.05)
    oakestra.list_applications()
    double.inject_faults(1, status=0, delay_s=1.5)

    started = time.monotonic()
    assert oakestra.list_applications() == []

    assert time.monotonic() - started >= 0.5


def test_connection_errors_are_retried_then_a_clear_error() -> None:
    url = f"http://127.0.0.1:{find_free_port()}"
    oakestra = OakestraClient(url, "Admin", "Admin", retries=2, backoff_s=0.1)

    started = time.monotonic()
    with pytest.raises(OakestraUnavailable, match=f"{url} did not answer.*after 3 attempts"):
        oakestra.active_clusters()

    assert time.monotonic() - started >= 0.3  # 0.1 + 0.2 s of backoff


def test_connection_errors_are_retried_until_oakestra_is_up(tmp_path: Path) -> None:
    port = find_free_port()
    late = OakestraDouble(tmp_path, port=port)
    starter = threading.Timer(0.5, late.start)
    oakestra = OakestraClient(late.url, "Admin", "Admin", retries=6, backoff_s=0.25)

    starter.start()
    try:
        clusters = oakestra.active_clusters()
    finally:
        starter.join()
        late.stop()

    assert [c["cluster_name"] for c in clusters] == ["cluster1"]


# ---- real instances (buildah) --------------------------------------------------------------

SLEEPER = (
    "import os, time; print('greeting', os.environ.get('GREETING'), flush=True); time.sleep(60)"
)


def build_image(base: str, ref: str, entrypoint: list[str]) -> str:
    """``ref``: ``base`` with ``entrypoint`` (and no cmd), pushed to the test registry."""

    def run(*argv: str) -> str:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    container = run("buildah", "from", "--tls-verify=false", base)
    run("buildah", "config", "--entrypoint", json.dumps(entrypoint), "--cmd", "", container)
    run("buildah", "commit", "--quiet", "--rm", container, ref)
    run("buildah", "push", "--quiet", "--tls-verify=false", ref)
    return ref


@pytest.fixture(scope="module")
def images(oci_registry: str, oci_base_image: str) -> dict[str, str]:
    """``sleeper`` (prints $GREETING, sleeps 60 s) and ``failer`` (exits 3), in the registry."""
    return {
        "sleeper": build_image(
            oci_base_image, f"{oci_registry}/test/sleeper:1", ["python3", "-c", SLEEPER]
        ),
        "failer": build_image(
            oci_base_image,
            f"{oci_registry}/test/failer:1",
            ["python3", "-c", "import sys; sys.exit(3)"],
        ),
    }


@pytest.fixture(scope="module")
def runner(
    images: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OakestraDouble]:
    """A double whose statuses reach the root 0.8 s late (started with the test storage)."""
    with OakestraDouble(
        tmp_path_factory.mktemp("oakestra-run"), workers=WORKERS, report_delay_s=0.8
    ) as running:
        yield running


@pytest.fixture
def runner_client(runner: OakestraDouble) -> Iterator[OakestraClient]:
    oakestra = OakestraClient(runner.url, "Admin", "Admin", timeout_s=5, backoff_s=0.05)
    yield oakestra
    for app in oakestra.list_applications():
        oakestra.delete_application(app["applicationID"])
    oakestra.close()


def containers() -> set[str]:
    result = subprocess.run(
        ["buildah", "containers", "--json"], capture_output=True, text=True, timeout=60, check=True
    )
    return {c["containername"] for c in json.loads(result.stdout or "[]") or []}


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def deploy(client: OakestraClient, name: str, image: str, **options: Any) -> str:
    app_id = new_app(client, name)
    options.setdefault("cluster", "cluster2")
    options.setdefault("node", "worker2")
    service_id = client.create_service(
        app_id, microservice("svc", "flops", image, platform=f"linux/{HOST_ARCH}", **options)
    )
    client.deploy_instance(service_id)
    return service_id


def test_an_instance_runs_its_image_and_its_status_progresses_late(
    runner: OakestraDouble, runner_client: OakestraClient, images: dict[str, str]
) -> None:
    service_id = deploy(runner_client, "running", images["sleeper"], env={"GREETING": "hello"})
    seen: list[str] = []
    worker_running_at = root_running_at = 0.0
    root_status_when_worker_ran = ""
    deadline = time.monotonic() + 60
    while not root_running_at and time.monotonic() < deadline:
        status = status_of(runner_client, service_id)
        if not seen or seen[-1] != status:
            seen.append(status)
        if status == "RUNNING":
            root_running_at = time.monotonic()
        elif status in TERMINAL_STATUSES:
            break
        elif not worker_running_at and any(
            i["status"] == "RUNNING" for i in runner.instances() if i["service_id"] == service_id
        ):
            worker_running_at = time.monotonic()
            root_status_when_worker_ran = status
        time.sleep(0.05)

    assert seen[-1] == "RUNNING", seen
    assert [PROGRESSION.index(s) for s in seen] == sorted(PROGRESSION.index(s) for s in seen)
    assert root_status_when_worker_ran in ("CLUSTER_SCHEDULED", "NODE_SCHEDULED")
    assert root_running_at - worker_running_at >= 0.5  # reported 0.8 s late
    instance = runner_client.get_service(service_id)["instance_list"][0]
    cluster2 = next(c for c in runner_client.active_clusters() if c["cluster_name"] == "cluster2")
    assert instance["cluster_id"] == cluster2["_id"]
    assert instance["worker_id"]
    assert (instance["host_ip"], instance["publicip"]) == ("127.0.0.1", "127.0.0.1")
    (worker_view,) = [i for i in runner.instances() if i["service_id"] == service_id]
    assert worker_view["worker"] == "worker2"
    wait_for(lambda: "greeting hello" in Path(worker_view["log"]).read_text(), 10)

    runner_client.undeploy_instance(service_id, 0)

    assert runner_client.get_service(service_id)["instance_list"] == []
    wait_for(lambda: worker_view["container"] not in containers(), 30, interval_s=0.3)
    assert not pid_alive(worker_view["pid"])


@pytest.mark.parametrize(
    ("image", "options", "status", "detail"),
    [
        ("failer", {}, "DEAD", "exited with code 3"),
        ("sleeper", {"cmd": ["python3", "-c", "print('cmd ran')"]}, "COMPLETED", "code 0"),
        ("sleeper", {"cmd": ["true"], "one_shot": False}, "DEAD", "code 0"),
    ],
    ids=["exit-3-is-dead", "cmd-replaces-entrypoint", "long-running-exit-0-is-dead"],
)
def test_an_instance_that_exits_reports_how(
    runner_client: OakestraClient,
    images: dict[str, str],
    image: str,
    options: dict[str, Any],
    status: str,
    detail: str,
) -> None:
    service_id = deploy(runner_client, f"exit{status}", images[image], **options)

    instance = wait_for(lambda: terminal_instance(runner_client, service_id), 60)

    assert instance["status"] == status
    assert detail in instance["status_detail"]


def test_a_killed_instance_is_dead(
    runner: OakestraDouble, runner_client: OakestraClient, images: dict[str, str]
) -> None:
    service_id = deploy(runner_client, "killed", images["sleeper"])
    wait_for(lambda: status_of(runner_client, service_id) == "RUNNING", 60)

    runner.kill_instance(service_id, 0)

    instance = wait_for(lambda: terminal_instance(runner_client, service_id), 30)
    assert instance["status"] == "DEAD"
    assert "exited with code 137" in instance["status_detail"]  # 128 + SIGKILL


def test_deleting_the_application_stops_its_running_instances(
    runner: OakestraDouble, runner_client: OakestraClient, images: dict[str, str]
) -> None:
    service_id = deploy(runner_client, "teardown", images["sleeper"])
    wait_for(lambda: status_of(runner_client, service_id) == "RUNNING", 60)
    (worker_view,) = [i for i in runner.instances() if i["service_id"] == service_id]
    app = runner_client.find_application(oakestra_name("test", "teardown"), "flops")
    assert app is not None

    assert runner_client.delete_application(app["applicationID"])

    wait_for(lambda: worker_view["container"] not in containers(), 30, interval_s=0.3)
    assert not pid_alive(worker_view["pid"])
    with pytest.raises(OakestraNotFound):
        runner_client.get_service(service_id)


# ---- the oakestra orchestrator backend on top of the client --------------------------------

SLEEPER_IMAGE = "registry.test/test/sleeper:1"
FAILER_IMAGE = "registry.test/test/failer:1"
PROCESS_IMAGES = {
    SLEEPER_IMAGE: [sys.executable, "-c", SLEEPER],
    FAILER_IMAGE: [sys.executable, "-c", "import sys; sys.exit(3)"],
}
RESTART_DELAY_S = 1.0
Exit = tuple[str, str, int | None, str]


@pytest.fixture(scope="module")
def process_runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OakestraDouble]:
    """A double whose ``sleeper`` and ``failer`` images run as host processes (no buildah),
    statuses reported 0.8 s late, ended instances restarted after 1 s."""
    images = PROCESS_IMAGES
    with OakestraDouble(
        tmp_path_factory.mktemp("oakestra-process"),
        workers=WORKERS,
        report_delay_s=0.8,
        restart_delay_s=RESTART_DELAY_S,
        process_images=images,
    ) as running:
        yield running


@pytest.fixture
def process_client(process_runner: OakestraDouble) -> Iterator[OakestraClient]:
    oakestra = OakestraClient(process_runner.url, "Admin", "Admin", timeout_s=5, backoff_s=0.05)
    yield oakestra
    for app in oakestra.list_applications():
        oakestra.delete_application(app["applicationID"])
    oakestra.close()


def test_orchestrator_reattaches_after_a_manager_restart_and_stop_deletes_everything(
    process_runner: OakestraDouble, process_client: OakestraClient
) -> None:
    # Setup: a "project" whose aggregator and learner are the sleeper image
    exits: list[tuple[str, str, int | None, str]] = []
    first = OakestraOrchestrator(
        OakestraClient(process_runner.url, "Admin", "Admin"), lambda *a: exits.append(a)
    )
    placement = Placement("cluster2", "worker2", f"linux/{HOST_ARCH}")
    deployment = Deployment(
        project_id="restart1",
        services=(
            ServiceSpec("aggregator", "aggregator", {}),
            ServiceSpec("learner-n1", "learner", {"GREETING": "hi"}, placement),
        ),
        images={"aggregator": SLEEPER_IMAGE, "learner": SLEEPER_IMAGE},
        resources={"memory": 200, "vcpus": 1, "storage": 0},
    )
    handles: list[dict[str, Any]] = []
    address = first.deploy(deployment, handles.append)

    # Execute: the manager stops without stopping the services; a new one re-attaches
    first.close(stop_services=False)
    second = OakestraOrchestrator(
        OakestraClient(process_runner.url, "Admin", "Admin"), lambda *a: exits.append(a)
    )
    gone = {**handles[1], "name": "learner-gone", "service_id": "0" * 24}
    states = second.reattach("restart1", [*handles, gone])
    running = wait_for(lambda: second.running_services("restart1") or None, 30)
    second.stop("restart1")

    # Assert
    assert [h["name"] for h in handles] == ["aggregator", "learner-n1"]
    assert address == f"127.0.0.1:{handles[0]['port']}"
    assert [(s.name, s.running) for s in states] == [
        ("aggregator", True),
        ("learner-n1", True),
        ("learner-gone", False),
    ]
    assert states[2].last_output == "the Oakestra service is gone"
    assert sorted(running) == ["aggregator", "learner-n1"]
    assert process_client.list_applications() == []
    wait_for(lambda: not process_runner.instances(), 30)
    assert exits == []  # stopping is not a service ending on its own
    second.close()


def test_orchestrator_reports_a_failed_instance_as_an_exit(
    process_runner: OakestraDouble, process_client: OakestraClient
) -> None:
    exits: list[tuple[str, str, int | None, str]] = []
    orchestrator = OakestraOrchestrator(
        OakestraClient(process_runner.url, "Admin", "Admin"), lambda *a: exits.append(a),
        poll_interval_s=0.2,
    )  # fmt: skip
    deployment = Deployment(
        project_id="fails1",
        services=(
            ServiceSpec("aggregator", "aggregator", {}),
            ServiceSpec("learner-n1", "learner", {}, Placement("cluster2", "worker2", "")),
        ),
        images={"aggregator": SLEEPER_IMAGE, "learner": FAILER_IMAGE},
    )

    orchestrator.deploy(deployment)
    wait_for(lambda: exits, 30)
    orchestrator.close()

    assert exits[0][:3] == ("fails1", "learner-n1", 3)  # the failer's exit code
    assert exits[0][3].startswith("Oakestra reports the instance DEAD (it crashed)")
    assert process_client.list_applications() == []


def fl_deployment(project_id: str, learner_image: str, node: str = "worker2") -> Deployment:
    """An aggregator (the sleeper, anywhere) and one learner on ``node`` of cluster2."""
    return Deployment(
        project_id=project_id,
        services=(
            ServiceSpec("aggregator", "aggregator", {}),
            ServiceSpec("learner-n1", "learner", {}, Placement("cluster2", node, "")),
        ),
        images={"aggregator": SLEEPER_IMAGE, "learner": learner_image},
    )


def instances_of(double: OakestraDouble, service_id: str) -> list[dict[str, Any]]:
    return [i for i in double.instances() if i["service_id"] == service_id]


def test_the_cluster_manager_restarts_a_dead_instance_until_it_is_undeployed(
    process_runner: OakestraDouble, process_client: OakestraClient
) -> None:
    service_id = deploy(process_client, "crashloop", FAILER_IMAGE)

    instance = wait_for(lambda: terminal_instance(process_client, service_id), 30)
    restarted = wait_for(
        lambda: [
            i for i in instances_of(process_runner, service_id) if i["container"][-2:] == "-3"
        ],
        30,
    )
    process_client.undeploy_instance(service_id, 0)
    time.sleep(3 * RESTART_DELAY_S)

    assert instance["status"] == "DEAD"
    assert restarted  # a third run of the same instance
    assert instances_of(process_runner, service_id) == []


def test_a_learner_that_crashes_is_reported_once_and_deleted_and_projects_are_polled_at_once(
    process_runner: OakestraDouble, process_client: OakestraClient
) -> None:
    # Setup: a project whose services run
    exits: list[Exit] = []
    orchestrator = OakestraOrchestrator(
        OakestraClient(process_runner.url, "Admin", "Admin"),
        lambda *a: exits.append(a),
        poll_interval_s=0.2,
    )
    handles: list[dict[str, Any]] = []
    orchestrator.deploy(fl_deployment("crash1", SLEEPER_IMAGE), handles.append)
    aggregator_id, learner_id = (h["service_id"] for h in handles)
    wait_for(lambda: status_of(process_client, learner_id) == "RUNNING", 30)
    before = process_runner.stats()
    time.sleep(2.0)
    polled = process_runner.stats()

    # Execute: the learner's container is killed
    process_runner.kill_instance(learner_id, 0)
    wait_for(lambda: exits, 30)
    time.sleep(3 * RESTART_DELAY_S)  # the cluster manager would have restarted it by now

    # Assert: one crash report with the exit code; the service is gone and did not restart
    assert [e[:3] for e in exits] == [("crash1", "learner-n1", 137)]
    assert exits[0][3].startswith("Oakestra reports the instance DEAD (it crashed)")
    with pytest.raises(OakestraNotFound):
        process_client.get_service(learner_id)
    assert instances_of(process_runner, learner_id) == []
    assert orchestrator.running_services("crash1") == ["aggregator"]
    aggregator = process_client.get_service(aggregator_id)
    assert aggregator["status"] == "RUNNING" and aggregator["status_detail"] == WAITING
    # one request per project and poll (about 10 in 2 s), none per service
    assert 3 <= delta(before, polled, "GET /api/services/<app_id>") <= 12
    assert delta(before, polled, "GET /api/service/<service_id>") == 0
    orchestrator.close()
    assert process_client.list_applications() == []


def test_a_learner_whose_node_oakestra_lacks_times_out_naming_the_node(
    process_runner: OakestraDouble, process_client: OakestraClient
) -> None:
    exits: list[Exit] = []
    orchestrator = OakestraOrchestrator(
        OakestraClient(process_runner.url, "Admin", "Admin"), lambda *a: exits.append(a),
        poll_interval_s=0.2, start_timeout_s=2.0,
    )  # fmt: skip
    handles: list[dict[str, Any]] = []

    started = time.monotonic()
    orchestrator.deploy(fl_deployment("nonode1", SLEEPER_IMAGE, node="nobody"), handles.append)
    wait_for(lambda: exits, 30)
    waited_s = time.monotonic() - started
    orchestrator.close()

    assert [e[:3] for e in exits] == [("nonode1", "learner-n1", UNKNOWN_EXIT)]
    assert "did not start it within 2 s" in exits[0][3]
    assert "CLUSTER_SCHEDULED for node 'nobody' of cluster 'cluster2'" in exits[0][3]
    assert waited_s >= 2.0


def test_no_worker_capacity_is_retried_not_an_end(tmp_path: Path) -> None:
    workers = (WorkerSpec("cluster1", "worker1"), WorkerSpec("cluster1", "worker2"))
    with OakestraDouble(
        tmp_path, workers=workers, worker_vcpus=2, restart_delay_s=0.3,
        process_images=PROCESS_IMAGES,
    ) as small:  # fmt: skip
        oakestra = OakestraClient(small.url, "Admin", "Admin")
        # the cluster has 4 vcpus, its nodes 2 each
        service_id = deploy(
            oakestra, "capacity", SLEEPER_IMAGE, vcpus=3, cluster="cluster1", node="worker1"
        )

        wait_for(lambda: status_of(oakestra, service_id) == "NO_WORKER_CAPACITY", 10)
        time.sleep(1.0)

        assert status_of(oakestra, service_id) == "NO_WORKER_CAPACITY"
        assert "NO_WORKER_CAPACITY" not in TERMINAL_STATUSES


@pytest.mark.slow
def test_statuses_pushed_every_15_s_still_end_the_project_services(tmp_path: Path) -> None:
    # Setup: Oakestra's real timing: the cluster pushes statuses and restarts ended instances
    # about every 15 s
    with OakestraDouble(
        tmp_path, workers=WORKERS, report_delay_s=15.0, restart_delay_s=15.0,
        process_images=PROCESS_IMAGES,
    ) as slow:  # fmt: skip
        exits: list[Exit] = []
        orchestrator = OakestraOrchestrator(
            OakestraClient(slow.url, "Admin", "Admin"), lambda *a: exits.append(a)
        )
        handles: list[dict[str, Any]] = []

        # Execute: the learner crashes at once
        started = time.monotonic()
        address = orchestrator.deploy(fl_deployment("slow1", FAILER_IMAGE), handles.append)
        running_after_s = time.monotonic() - started
        wait_for(lambda: exits, 90, interval_s=0.5)
        ended_after_s = time.monotonic() - started
        learner_id = handles[1]["service_id"]
        wait_for(lambda: not instances_of(slow, learner_id), 30)
        survivors = orchestrator.running_services("slow1")
        orchestrator.close()

    # Assert: seen 15 s late, reported once as a crash, deleted (no crash loop)
    assert address.startswith("127.0.0.1:") and running_after_s >= 15.0
    assert [e[:3] for e in exits] == [("slow1", "learner-n1", 3)]
    assert ended_after_s >= 30.0
    assert survivors == ["aggregator"]
