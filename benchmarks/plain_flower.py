"""The baseline of ``overhead.py``: the example repository trained with plain Flower.

``python plain_flower.py server ADDRESS ROUNDS CLIENTS`` runs a FedAvg server;
``python plain_flower.py client ADDRESS`` runs a client over the repository's ModelManager
(data from ``$FLOPS_DATA_SERVER``, as a learner would load it). Run it with the interpreter of
the environment FLOps built for the repository and ``$FLOPS_ML_REPO_DIR`` set, so both sides
run the same code on the same partitions. No MLflow, no MQTT, no orchestration.
"""

import sys
from typing import Any

import flwr as fl
from flwr.common import Metrics, ndarrays_to_parameters

from flops_utils.ml_repo_files_proxy import get_model_manager
from flops_utils.net import wait_for_port


def weighted_accuracy(results: list[tuple[int, Metrics]]) -> Metrics:
    """Accuracy averaged over clients, weighted by their evaluation sample counts."""
    total = sum(n for n, _ in results)
    return {"accuracy": sum(n * float(m["accuracy"]) for n, m in results) / total}


def serve(address: str, rounds: int, clients: int) -> None:
    """Run FedAvg for ``rounds`` rounds with exactly ``clients`` clients; print the accuracy."""
    strategy = fl.server.strategy.FedAvg(
        fraction_fit=1.0,
        fraction_evaluate=1.0,
        min_fit_clients=clients,
        min_evaluate_clients=clients,
        min_available_clients=clients,
        initial_parameters=ndarrays_to_parameters(get_model_manager().get_model_parameters()),
        evaluate_metrics_aggregation_fn=weighted_accuracy,
    )
    history = fl.server.start_server(
        server_address=address, config=fl.server.ServerConfig(num_rounds=rounds), strategy=strategy
    )
    print("accuracy", history.metrics_distributed["accuracy"][-1][1], flush=True)


class Client(fl.client.NumPyClient):  # type: ignore[misc]
    """The repository's ModelManager as a Flower NumPyClient."""

    def __init__(self) -> None:
        self.manager = get_model_manager()
        self.manager.set_model_data()

    def get_parameters(self, config: dict[str, Any]) -> Any:
        return self.manager.get_model_parameters()

    def fit(self, parameters: Any, config: dict[str, Any]) -> Any:
        self.manager.set_model_parameters(parameters)
        samples = self.manager.fit_model()
        return self.manager.get_model_parameters(), samples, {}

    def evaluate(self, parameters: Any, config: dict[str, Any]) -> Any:
        self.manager.set_model_parameters(parameters)
        loss, accuracy, samples = self.manager.evaluate_model()
        return float(loss), int(samples), {"accuracy": float(accuracy)}


if __name__ == "__main__":
    if sys.argv[1] == "server":
        serve(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        client = Client().to_client()
        host, _, port = sys.argv[2].rpartition(":")
        wait_for_port(host, int(port), 60.0)  # as a user starts clients once the server runs
        fl.client.start_client(server_address=sys.argv[2], client=client)
