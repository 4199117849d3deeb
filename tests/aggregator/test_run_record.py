"""What the aggregator's MLflow run records beyond the aggregated metrics: per-learner metrics,
participants and lost learners, provenance, and the registered model's name (pure parts; the
MLflow side runs in ``test_training.py`` and ``tests/e2e/test_mlflow_record.py``)."""

import json
from pathlib import Path

import pytest

from aggregator.config import AggregatorConfig, ConfigError
from aggregator.flower_server import ClientRound, RoundResult
from aggregator.run_record import (
    LOST_TAG,
    NOTE_TAG,
    PARTICIPANTS_TAG,
    PROJECT_URL_TAG,
    Participation,
    client_prefix,
    metric_key,
    provenance_params,
    provenance_tags,
    round_metrics,
    software_versions,
)
from flops_utils.contract.tracking import (
    Provenance,
    registered_model_name,
    repo_identity,
    repo_name,
    without_credentials,
)

EXAMPLE_REPO = Path(__file__).resolve().parents[2] / "examples" / "mnist_sklearn"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _round(
    number: int, clients: tuple[ClientRound, ...], dropped: tuple[str, ...] = ()
) -> RoundResult:
    return RoundResult(
        round=number,
        loss=0.5,
        accuracy=0.8,
        fit_examples=sum(c.fit_examples or 0 for c in clients),
        evaluate_examples=sum(c.evaluate_examples or 0 for c in clients),
        learners=len(clients),
        seconds=1.25,
        clients=clients,
        dropped=dropped,
    )


def _client(name: str, examples: int) -> ClientRound:
    return ClientRound(
        name=name,
        fit_examples=examples,
        fit_metrics={"fit_seconds": 0.5, "loss": 0.3},
        evaluate_examples=examples // 10,
        loss=0.4,
        evaluate_metrics={"accuracy": 0.9},
    )


def test_registered_model_is_one_per_customer_and_repository() -> None:
    # Execute
    alice = registered_model_name("alice", "https://github.com/org/mnist.git")
    alice_again = registered_model_name("alice", "https://TOKEN@GitHub.com/org/mnist/")
    bob = registered_model_name("bob", "https://github.com/org/mnist.git")
    other_repo = registered_model_name("alice", "https://gitlab.com/x/mnist", distinct=True)
    same_repo_distinct = registered_model_name("alice", "https://github.com/org/mnist", True)
    odd_customer = registered_model_name("Alice Smith: QA", "/srv/repos/mnist_sklearn/")

    # Assert: spellings of one repository share a name; customers and repositories do not.
    assert alice == alice_again == "flops-alice-mnist"
    assert bob == "flops-bob-mnist"
    assert other_repo.startswith("flops-alice-mnist-") and other_repo != same_repo_distinct
    assert same_repo_distinct == registered_model_name(
        "alice", "https://GITHUB.com/org/mnist.git/", distinct=True
    )
    assert odd_customer.startswith("flops-Alice_Smith_QA-") and odd_customer.endswith(
        "-mnist_sklearn"
    )
    assert registered_model_name("a b", "r") != registered_model_name("a_b", "r")


def test_repository_urls_lose_their_credentials_and_spelling() -> None:
    # Assert
    assert without_credentials("https://user:secret@host/org/r.git") == "https://host/org/r.git"
    assert without_credentials("git@host:org/r.git") == "git@host:org/r.git"
    assert repo_identity("HTTPS://tok@Host/org/r.git/") == "https://host/org/r"
    assert repo_name("git@github.com:org/mnist.git") == "mnist"
    assert repo_name("file:///srv/repos/mnist/") == "mnist"
    assert repo_name("") == "repo"


def test_round_metrics_name_each_learner_at_the_round() -> None:
    # Prepare
    result = _round(2, (_client("node-1", 300), _client("node 2/x", 100)))

    # Execute
    metrics = round_metrics(result, "learner", lost=["node-3"])

    # Assert: aggregated, counts and per-learner metrics (unsafe characters replaced)
    assert metrics["loss"] == 0.5 and metrics["accuracy"] == 0.8
    assert (metrics["learners"], metrics["lost_learners"]) == (2.0, 1.0)
    assert (metrics["fit_examples"], metrics["evaluate_examples"]) == (400.0, 40.0)
    assert metrics["round_seconds"] == 1.25
    assert metrics["learner.node-1/fit_examples"] == 300.0
    assert metrics["learner.node-1/fit_seconds"] == 0.5
    assert metrics["learner.node-1/fit_loss"] == 0.3
    assert metrics["learner.node-1/evaluate_examples"] == 30.0
    assert metrics["learner.node-1/loss"] == 0.4
    assert metrics["learner.node-1/accuracy"] == 0.9
    assert metrics[metric_key("learner", "node 2/x", "accuracy")] == 0.9
    assert "learner.node 2_x/accuracy" in metrics
    assert (client_prefix("learner"), client_prefix("cluster aggregator")) == (
        "learner",
        "cluster",
    )


def test_participation_lists_participants_and_lost_learners() -> None:
    # Prepare
    participation = Participation(frozenset({"node-1", "node-2", "node-3"}))
    both = (_client("node-1", 10), _client("node-2", 10))
    evaluated_only = ClientRound(name="node-2", evaluate_examples=5, loss=0.1)

    # Execute
    first = participation.record(_round(1, (*both, _client("node-3", 10))))
    first_tags = participation.tags()
    second = participation.record(_round(2, (both[0], evaluated_only), dropped=("node-2",)))

    # Assert: node-3 never came back in round 2, node-2 was dropped from its training
    assert first == [] and LOST_TAG not in first_tags
    assert first_tags[PARTICIPANTS_TAG] == "node-1,node-2,node-3"
    assert second == ["node-2", "node-3"]
    assert participation.tags() == {
        PARTICIPANTS_TAG: "node-1,node-2,node-3",
        LOST_TAG: "node-2,node-3",
    }


def test_provenance_becomes_tags_and_params_without_none() -> None:
    # Prepare
    provenance = Provenance(
        repo_url="https://user:tok@github.com/org/mnist.git",
        commit=COMMIT,
        environment_key="k" * 32,
        images={"learner": "reg/flops/learner@sha256:ab"},
        versions={"scikit-learn": "1.5.0"},
        data={"node-2": {"mnist": 20}, "node-1": {"mnist": 30}},
        learners=["node-2", "node-1"],
        project_url="http://manager:8080/api/flops/projects/p1",
    )
    versions = software_versions()

    # Execute
    tags = provenance_tags("p1", "alice", provenance, "FedAvg", versions)
    params = provenance_params(provenance, versions)
    bare_tags = provenance_tags("p2", "bob", Provenance(commit="f" * 64), "FedProx", {})
    bare_params = provenance_params(Provenance(), {})

    # Assert
    assert tags["flops.repo_url"] == "https://github.com/org/mnist.git"
    assert tags["mlflow.source.git.repoURL"] == tags["flops.repo_url"]
    assert tags["flops.commit"] == tags["mlflow.source.git.commit"] == COMMIT
    assert tags["flops.image.learner"] == "reg/flops/learner@sha256:ab"
    assert tags["flops.strategy"] == "FedAvg" and tags["flops.customer_id"] == "alice"
    assert tags[PROJECT_URL_TAG] == provenance.project_url
    assert provenance.project_url in tags[NOTE_TAG] and "tok" not in json.dumps(tags)
    assert tags["flops.flower_version"] == versions["flower"] and "flops" in versions
    assert params["data.mnist.node-1.rows"] == 30 and params["data.rows"] == 50
    assert params["learners"] == "node-1,node-2"
    assert params["environment.versions.scikit-learn"] == "1.5.0"
    assert params["flower_version"] == versions["flower"]
    # A directory's content hash is no git commit; unknown values are left out.
    assert "mlflow.source.git.commit" not in bare_tags and "flops.repo_url" not in bare_tags
    assert bare_params == {}
    assert all(v not in (None, "None", "") for v in [*tags.values(), *params.values()])


def _env(**overrides: str) -> dict[str, str]:
    return {
        "FLOPS_PROJECT_ID": "abc",
        "FLOPS_MQTT_URL": "mqtt://127.0.0.1:1883",
        "FLOPS_AGGREGATOR_ADDRESS": "127.0.0.1:8080",
        "FLOPS_MLFLOW_URL": "http://127.0.0.1:5000",
        "FLOPS_ML_REPO_DIR": str(EXAMPLE_REPO),
        "FLOPS_SLA": (EXAMPLE_REPO / "sla.json").read_text(),
        **overrides,
    }


def test_config_reads_the_registered_model_and_the_provenance() -> None:
    # Prepare
    provenance = Provenance(commit=COMMIT, data={"n": {"mnist": 3}}, learners=["n"])

    # Execute
    plain = AggregatorConfig.from_env(_env())
    given = AggregatorConfig.from_env(
        _env(
            FLOPS_REGISTERED_MODEL="flops-alice-mnist",
            FLOPS_PROVENANCE=provenance.model_dump_json(exclude_none=True),
        )
    )

    # Assert
    assert (plain.registered_model, plain.provenance) == ("", Provenance())
    assert given.registered_model == "flops-alice-mnist"
    assert given.provenance == provenance
    with pytest.raises(ConfigError, match="FLOPS_PROVENANCE"):
        AggregatorConfig.from_env(_env(FLOPS_PROVENANCE='{"data": [1]}'))
