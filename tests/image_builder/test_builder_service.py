"""The image builder as a service (``python -m image_builder.main``), driven by the manager's
``oci`` backend (:class:`flops_manager.builds.ImageBuildService`): a real child process,
a real Mosquitto broker, buildah, a loopback registry and the local Debian base image."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from builder_testing import copy_example
from mqtt_testing import MqttRecorder, manager_mqtt
from waiting import wait_until

from flops_manager.broker import MosquittoBroker
from flops_manager.builds import (
    BUILDERS,
    ImageBuildFailed,
    ImageBuildService,
    RegistrySettings,
    VenvProjectBuilder,
    make_builder,
)
from flops_manager.config import ManagerConfig
from flops_manager.errors import ConfigurationError
from flops_manager.sla import ProjectSLA
from flops_manager.suite import ManagerSuite
from flops_utils import env_vars
from flops_utils.contract.exit_codes import ExitCode
from flops_utils.notifications import StatusNotifier
from flops_utils.types import Component
from image_builder.main import main, progress_publisher
from image_builder.oci_builder import BuildStep
from observatory.mlflow_server import MlflowServer


@pytest.fixture(scope="module")
def service(
    oci_registry: str,
    oci_base_image: str,
    mqtt_broker: MosquittoBroker,
    tmp_path_factory: pytest.TempPathFactory,
) -> ImageBuildService:
    settings = RegistrySettings(oci_registry, oci_base_image, tls_verify=False)
    return ImageBuildService(settings, tmp_path_factory.mktemp("image-cache"), mqtt_broker.url)


def _sla(repo: Path) -> ProjectSLA:
    return ProjectSLA.model_validate(
        {"ml_repo_url": str(repo), "ml_model_flavor": "sklearn", "training_configuration": {}}
    )


def _registry_digest(ref: str) -> str:
    result = subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", f"docker://{ref}"],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    return str(json.loads(result.stdout)["Digest"])


def test_service_builds_pushes_and_reports_over_mqtt(
    service: ImageBuildService, recorder: MqttRecorder, project_id: str, tmp_path: Path
) -> None:
    # Setup: the example with a file of its own, so that its images are not those of other
    # modules' builds of the same content (their source label names their own copy)
    repo = copy_example(tmp_path / "mnist")
    (repo / "BUILT_BY_SERVICE.md").write_text("built by the image builder service test\n")

    # Execute
    result = service.build(project_id, _sla(repo), tmp_path / "work")

    # Assert: pinned references of both roles, present in the registry with that digest
    assert set(result.images) == {"learner", "aggregator"}
    for role, ref in result.images.items():
        name, _, digest = ref.partition("@")
        assert name.endswith(f"/flops/{role}") and digest.startswith("sha256:")
        assert _registry_digest(f"{name}:{result.key}") == digest
    assert result.python is None and result.repo_dir is None
    assert result.document()["images"] == dict(result.images)
    # the service announced itself and its outcome, with the same images
    started = recorder.wait_for("builder/started")[0]
    assert started["data"]["ml_repo_url"] == str(repo)
    assert started["data"]["platforms"] == ["linux/amd64"]
    success = recorder.wait_for("builder/success")[0]
    assert success["data"]["key"] == result.key
    assert success["data"]["platforms"] == ["linux/amd64"]
    for role, image in success["data"]["images"].items():
        assert image["ref"] == result.images[role]
        assert image["platform_digests"] == {"linux/amd64": image["digest"]}
    assert recorder.find("builder/failed") == []
    # and each milestone in between, in order, with its timing
    statuses = [topic.rsplit("/", 1)[1] for topic in recorder.topics()]
    assert statuses == ["started", *["progress"] * (len(statuses) - 2), "success"]
    progress = [message["data"] for message in recorder.find("builder/progress")]
    assert [(data["step"], data.get("role")) for data in progress] == [
        ("base_resolved", None),
        ("repository_fetched", None),
        ("dependencies_prepared", None),
        ("image_built", "learner"),
        ("image_pushed", "learner"),
        ("image_built", "aggregator"),
        ("image_pushed", "aggregator"),
    ]
    assert all(isinstance(data["seconds"], float) and data["seconds"] >= 0 for data in progress)
    assert progress[1]["commit"] == success["data"]["commit"]
    pushed = {data["role"]: data["ref"] for data in progress if data["step"] == "image_pushed"}
    assert pushed == dict(result.images)
    messages = [message["message"] for message in recorder.find("builder/progress")]
    assert messages[3].startswith("learner image for linux/amd64 built in ")
    assert (tmp_path / "work" / "image-builder.log").is_file()


def test_uninstallable_dependency_fails_with_the_resolvers_message(
    service: ImageBuildService, recorder: MqttRecorder, project_id: str, tmp_path: Path
) -> None:
    # Setup: a requirement no index has
    repo = copy_example(tmp_path / "broken")
    (repo / "conda.yaml").unlink()
    (repo / "requirements.txt").write_text("flops-no-such-package-4711==1.0\n")

    # Execute
    with pytest.raises(ImageBuildFailed) as caught:
        service.build(project_id, _sla(repo), tmp_path / "work")

    # Assert: the manager gets the service's own sentence, and so does MQTT
    assert "flops-no-such-package-4711" in caught.value.message
    assert "error: dependency_install_failed" in caught.value.details
    failed = recorder.wait_for("builder/failed")[0]
    assert failed["message"] == caught.value.message
    assert failed["data"] == {
        "error": "dependency_install_failed",
        "exit_code": int(ExitCode.BUILD_FAILED),
    }


def test_every_build_step_is_published_with_a_sentence(
    mqtt_broker: MosquittoBroker, recorder: MqttRecorder, project_id: str
) -> None:
    # Prepare: each step with the data its BuildStep documents
    ref = "reg:5000/flops/learner@sha256:12"
    samples: dict[str, dict[str, object]] = {
        BuildStep.BASE_RESOLVED: {
            "base_image": "reg:5000/flops/base:1", "digest": "sha256:ab",
            "platforms": ["linux/amd64"], "seconds": 0.12345,
        },
        BuildStep.REPOSITORY_FETCHED: {"commit": "c" * 40, "seconds": 1.0},
        BuildStep.MODEL_DOWNLOADED: {"model_uri": "models:/m/1", "run_id": "r1", "seconds": 2.0},
        BuildStep.DEPENDENCIES_PREPARED: {"platforms": ["linux/amd64"], "seconds": 3.0},
        BuildStep.IMAGE_REUSED: {
            "role": "learner", "ref": ref, "digest": "sha256:12", "seconds": 0.1,
        },
        BuildStep.IMAGE_BUILT: {"role": "learner", "platform": "linux/arm64", "seconds": 4.0},
        BuildStep.IMAGE_PUSHED: {
            "role": "learner", "ref": ref, "digest": "sha256:12",
            "platform_digests": {"linux/amd64": "sha256:12"}, "seconds": 5.0,
        },
    }  # fmt: skip
    assert set(samples) == set(BuildStep)
    notifier = StatusNotifier(mqtt_broker.url, project_id, Component.BUILDER)

    # Execute
    try:
        publish = progress_publisher(notifier)
        for step, data in samples.items():
            publish(step, dict(data))
    finally:
        notifier.close()

    # Assert: one progress message per step, in order, its data with the step's name
    wait_until(lambda: len(recorder.find("builder/progress")) >= len(samples), 10)
    progress = recorder.find("builder/progress")
    assert [message["data"] for message in progress] == [
        {"step": str(step), **data, "seconds": round(float(str(data["seconds"])), 3)}
        for step, data in samples.items()
    ]
    messages = [message["message"] for message in progress]
    assert messages[0] == "base image reg:5000/flops/base:1 resolved in 0.1 s"
    assert messages[1] == "repository fetched at cccccccccccc in 1.0 s"
    assert messages[5] == "learner image for linux/arm64 built in 4.0 s"
    assert messages[6] == f"learner image pushed in 5.0 s: {ref}"


def test_missing_settings_are_a_config_error_with_an_outcome_and_a_message(
    tmp_path: Path, mqtt_broker: MosquittoBroker, recorder: MqttRecorder, project_id: str
) -> None:
    # Setup: no registry, no base image
    result_file = tmp_path / "result.json"
    env = {
        env_vars.PROJECT_ID: project_id,
        env_vars.MQTT_URL: mqtt_broker.url,
        env_vars.ML_REPO_URL: str(tmp_path),
        env_vars.BUILD_RESULT_FILE: str(result_file),
    }

    # Execute
    code = main(env)

    # Assert: the outcome file and the failed message name the variable and the exit code
    assert code == ExitCode.CONFIG_ERROR
    outcome = json.loads(result_file.read_text())
    assert outcome["status"] == "failed"
    assert outcome["error"] == "image_builder_config_error"
    assert "FLOPS_REGISTRY is not set" in outcome["message"]
    [failed] = recorder.wait_for("builder/failed")
    assert failed["data"] == {"error": "image_builder_config_error", "exit_code": 2}
    assert "FLOPS_REGISTRY is not set" in failed["message"]


def test_bad_flavor_and_tls_values_name_the_variable(tmp_path: Path) -> None:
    base = {  # no FLOPS_PROJECT_ID: there is no project to report the failure to
        env_vars.MQTT_URL: "mqtt://127.0.0.1:1",
        env_vars.ML_REPO_URL: str(tmp_path),
        env_vars.REGISTRY: "127.0.0.1:5000",
        env_vars.BASE_IMAGE: "127.0.0.1:5000/base:1",
        env_vars.BUILD_RESULT_FILE: str(tmp_path / "r.json"),
    }
    for extra, expected in (
        ({env_vars.ML_MODEL_FLAVOR: "caffe"}, "FLOPS_ML_MODEL_FLAVOR='caffe' is not a flavor"),
        ({env_vars.REGISTRY_TLS_VERIFY: "maybe"}, "FLOPS_REGISTRY_TLS_VERIFY='maybe'"),
        ({env_vars.MQTT_URL: "http://x"}, "FLOPS_MQTT_URL"),
    ):
        assert main({**base, **extra}) == ExitCode.CONFIG_ERROR
        assert expected in json.loads((tmp_path / "r.json").read_text())["message"]


def test_service_without_an_outcome_is_a_clean_error(tmp_path: Path) -> None:
    # Setup: an "interpreter" that exits at once without writing anything
    fake_python = tmp_path / "python"
    fake_python.write_text("#!/bin/sh\necho 'Illegal instruction' >&2\nexit 132\n")
    fake_python.chmod(0o755)
    service = ImageBuildService(
        RegistrySettings("127.0.0.1:1", "127.0.0.1:1/base:x"),
        tmp_path / "cache",
        "mqtt://127.0.0.1:1",
        python=str(fake_python),
    )

    # Execute
    with pytest.raises(ImageBuildFailed) as caught:
        service.build("p1", _sla(tmp_path), tmp_path / "work")

    # Assert
    assert "exited with code 132 (killed by signal 4, SIGILL)" in caught.value.message
    assert "It wrote no outcome" in caught.value.message
    assert caught.value.details == ["Illegal instruction"]


def test_oci_builder_needs_a_registry_and_a_base_image(tmp_path: Path) -> None:
    config = ManagerConfig(home=tmp_path, builder="oci", registry="127.0.0.1:5000")
    with pytest.raises(ConfigurationError, match="needs FLOPS_BASE_IMAGE"):
        make_builder(config, tmp_path, "mqtt://127.0.0.1:1883")
    with pytest.raises(ConfigurationError, match=r"one of \['oci', 'venv'\]"):
        make_builder(ManagerConfig(home=tmp_path, builder="docker"), tmp_path, "")
    assert sorted(BUILDERS) == ["oci", "venv"]


def test_builder_defaults_to_what_the_orchestrator_runs(tmp_path: Path) -> None:
    config = ManagerConfig(home=tmp_path, registry="r:5000", base_image="r:5000/base:1")
    assert config.builder == ""
    for_images = make_builder(config, tmp_path, "mqtt://127.0.0.1:1883", needs_images=True)
    for_venvs = make_builder(config, tmp_path, "mqtt://127.0.0.1:1883")
    assert isinstance(for_images, ImageBuildService) and for_images.produces_images
    assert isinstance(for_venvs, VenvProjectBuilder) and not for_venvs.produces_images


def test_manager_config_reads_the_registry_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOPS_BUILDER", "oci")
    monkeypatch.setenv("FLOPS_REGISTRY", "registry.local:5000")
    monkeypatch.setenv("FLOPS_REGISTRY_TLS_VERIFY", "false")
    monkeypatch.setenv("FLOPS_BASE_IMAGE", "registry.local:5000/python:3.11-slim")
    config = ManagerConfig.from_env(home=Path("/tmp/x"))
    builder = make_builder(config, Path("/tmp/x"), "mqtt://127.0.0.1:1883")
    assert isinstance(builder, ImageBuildService)
    assert builder.produces_images
    assert builder.settings == RegistrySettings(
        "registry.local:5000", "registry.local:5000/python:3.11-slim", "flops", False
    )
    assert sys.executable == builder.python


def test_images_are_handed_out_under_the_public_registry_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The docker-compose suite pushes to ``registry:5000`` (its service name) while workers
    and users pull from the published address: the references handed out name the latter,
    with the same path and digest; other references are left alone."""
    monkeypatch.setenv("FLOPS_BUILDER", "oci")
    monkeypatch.setenv("FLOPS_REGISTRY", "registry:5000")
    monkeypatch.setenv("FLOPS_REGISTRY_PUBLIC", "203.0.113.7:5000")
    monkeypatch.setenv("FLOPS_BASE_IMAGE", "registry:5000/flops/base:12")
    config = ManagerConfig.from_env(home=Path("/tmp/x"))
    builder = make_builder(config, Path("/tmp/x"), "mqtt://127.0.0.1:1883")
    assert isinstance(builder, ImageBuildService)
    digest = "sha256:" + "ab" * 32

    settings = builder.settings
    pushed = settings.public_ref(f"registry:5000/flops/learner@{digest}")
    foreign = settings.public_ref(f"registry:50001/flops/learner@{digest}")
    unset = RegistrySettings("registry:5000", "b").public_ref(f"registry:5000/flops/m@{digest}")

    assert pushed == f"203.0.113.7:5000/flops/learner@{digest}"
    assert foreign == f"registry:50001/flops/learner@{digest}"
    assert unset == f"registry:5000/flops/m@{digest}"


def test_local_orchestrator_refuses_the_oci_builder_at_start(
    mqtt_broker: MosquittoBroker, mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    config = ManagerConfig(
        home=tmp_path,
        port=0,
        **manager_mqtt(mqtt_broker),
        mlflow_url=mlflow_server.url,
        builder="oci",
        registry="127.0.0.1:5000",
        base_image="127.0.0.1:5000/flops/base:1",
        insecure=frozenset({"mlflow"}),
    )
    with pytest.raises(ConfigurationError, match="runs virtualenvs on this machine") as caught:
        ManagerSuite(config).start()
    assert "set FLOPS_BUILDER=venv" in caught.value.message
