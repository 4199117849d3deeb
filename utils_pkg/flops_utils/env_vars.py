"""Names of the environment variables through which FLOps configures its runtime roles.

The orchestrator sets them when it starts a learner or an aggregator (a child process
in the ``local`` backend, a container's ``environment`` with Oakestra).
"""

PROJECT_ID = "FLOPS_PROJECT_ID"
"""The project's id (hex string)."""

MQTT_URL = "FLOPS_MQTT_URL"
"""Broker address as ``mqtt://HOST:PORT``."""

DATA_SERVER = "FLOPS_DATA_SERVER"
"""The learner node's Arrow Flight data server, e.g. ``grpc://127.0.0.1:8815``."""

DATA_TAGS = "FLOPS_DATA_TAGS"
"""Comma-separated data tags from the SLA, e.g. ``mnist`` or ``mnist,mnist-extra``."""

AGGREGATOR_ADDRESS = "FLOPS_AGGREGATOR_ADDRESS"
"""``HOST:PORT`` of the Flower server the learner connects to / the aggregator binds."""

ML_REPO_DIR = "FLOPS_ML_REPO_DIR"
"""Directory holding the user's ML repository (put on ``sys.path``)."""

LEARNER_NAME = "FLOPS_LEARNER_NAME"
"""A name for this learner instance (e.g. the node id), used in status messages."""

MLFLOW_URL = "FLOPS_MLFLOW_URL"
"""``http://HOST:PORT`` of the MLflow tracking server the aggregator logs to."""

SLA = "FLOPS_SLA"
"""The project's validated SLA as JSON (``flops_manager.sla.ProjectSLA``), for the aggregator."""

CONNECT_TIMEOUT_S = "FLOPS_CONNECT_TIMEOUT_S"
"""Optional. Seconds a learner keeps trying to reach its aggregator, and an aggregator waits
for ``min_available_clients`` learners to connect. Defaults: learner 60, aggregator 300."""

MANAGER_TOKEN = "FLOPS_MANAGER_TOKEN"
"""The manager's API token, for processes that call its REST API (e.g. a data server
registering its node)."""
