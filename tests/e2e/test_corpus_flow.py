"""Real-world-style repositories, unchanged, from POST to ``completed`` on the embedded default.

Each repository of ``tests/corpus`` (an MLflow-2024 ``conda.yaml`` with exact pins of its time,
a PyTorch CNN pinning torch/pandas/tqdm/numpy 1.26, a Keras model pinning TensorFlow 2.12 and
NumPy 1.23) is trained by two learners on disjoint MNIST
shards; the registered model is downloaded and loaded with ``mlflow.pyfunc`` in the
repository's own environment, where it must predict held-out digits far better than chance.
"""

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from data_server.mnist import mnist_table
from flops_manager.auth import read_api_token
from flops_manager.client import ManagerClient
from flops_manager.config import ManagerConfig
from flops_manager.demo import local_nodes, run_project
from flops_manager.suite import ManagerSuite

CORPUS = Path(__file__).resolve().parents[1] / "corpus"
TAG = "mnist-corpus"
SHARD_ROWS = 3000
HELD_OUT = (8000, 10_000)
ROUNDS = 3
PROJECT_TIMEOUT_S = 900

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PREDICT = r"""
import json, sys
import numpy as np
import mlflow.pyfunc

model = mlflow.pyfunc.load_model(sys.argv[1])
images = np.load(sys.argv[2]).astype(np.float32) / 255.0
try:
    predicted = model.predict(images.reshape(len(images), -1))
except Exception:  # a model whose signature wants images (e.g. a CNN)
    predicted = model.predict(images.reshape(len(images), 1, 28, 28))
predicted = np.asarray(predicted)
if predicted.ndim == 2:  # scores per class
    predicted = predicted.argmax(axis=1)
print(json.dumps(predicted.astype(int).tolist()))
"""


@pytest.fixture(scope="module")
def client(
    tmp_path_factory: pytest.TempPathFactory, manager_config: ManagerConfig
) -> Iterator[ManagerClient]:
    """A manager with two local nodes holding disjoint MNIST shards under ``TAG``."""
    with ManagerSuite(manager_config) as suite:
        token = read_api_token(manager_config.home)
        api = ManagerClient(suite.url, token=token)
        with local_nodes(2, Path(tmp_path_factory.mktemp("nodes")), suite.url, token) as nodes:
            table = mnist_table()
            for index, node in enumerate(nodes):
                with node.client() as data:
                    data.put_table(TAG, table.slice(index * SHARD_ROWS, SHARD_ROWS))
            api.wait_for_nodes(2, timeout_s=60, tag=TAG)
            yield api


def corpus_sla(name: str) -> dict[str, Any]:
    """The repository's own ``sla.json`` pointed at its folder, the shards and ``ROUNDS``."""
    sla: dict[str, Any] = json.loads((CORPUS / name / "sla.json").read_text())
    sla["ml_repo_url"] = str(CORPUS / name)
    sla["training_configuration"].update(
        data_tags=[TAG],
        training_rounds=ROUNDS,
        min_available_clients=2,
        min_fit_clients=2,
        min_evaluate_clients=2,
    )
    return sla


@pytest.mark.parametrize(
    ("name", "expected_versions"),
    [
        ("sklearn_mlflow2024", {"numpy": "1.26.4", "scikit-learn": "1.4.2", "mlflow": "2.12.1"}),
        ("pytorch_mnist", {"numpy": "1.26.4", "torch": "2.13.0+cpu", "pandas": "2.2.1"}),
        ("keras_tf212", {"numpy": "1.23.5", "tensorflow": "2.12.0", "keras": "2.12.0"}),
    ],
)
def test_a_corpus_repository_trains_unchanged_and_its_model_predicts(
    client: ManagerClient,
    mlflow_server: Any,
    tmp_path: Path,
    name: str,
    expected_versions: dict[str, str],
) -> None:
    # Execute
    project = run_project(client, corpus_sla(name), PROJECT_TIMEOUT_S)

    # Assert: completed, every round, in the repository's own pinned environment
    assert project["status"] == "completed", project["status_message"]
    assert [r["round"] for r in project["rounds"]] == list(range(1, ROUNDS + 1))
    environment = project["environment"]
    for distribution, version in expected_versions.items():
        assert environment["versions"][distribution] == version
    if name == "sklearn_mlflow2024":  # conda.yaml asks for python=3.10.14
        notes = [e["message"] for e in project["events"] if e.get("status") == "note"]
        assert any("Python 3.10.14" in note for note in notes), notes

    # Assert: the registered model loads with pyfunc in that environment and predicts
    import mlflow

    mlflow.set_tracking_uri(mlflow_server.url)
    model_dir = mlflow.artifacts.download_artifacts(
        project["mlflow"]["registered_model_uri"], dst_path=str(tmp_path / "model")
    )
    images, labels = _held_out()
    np.save(tmp_path / "images.npy", images)
    result = subprocess.run(
        [
            project["admin"]["environment_paths"]["user_python"],
            "-c",
            PREDICT,
            model_dir,
            str(tmp_path / "images.npy"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    predicted = np.asarray(json.loads(result.stdout.strip().splitlines()[-1]))
    accuracy = float((predicted == labels).mean())
    print(f"\n{name}: held-out accuracy {accuracy:.3f}")
    assert accuracy >= 0.6  # chance is 0.1


def _held_out() -> tuple[np.ndarray, np.ndarray]:
    from data_server.mnist import load_mnist_arrays

    images, labels = load_mnist_arrays()
    start, stop = HELD_OUT
    return images[start:stop], labels[start:stop]
