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

AGGREGATOR_ROLE = "FLOPS_AGGREGATOR_ROLE"
"""Optional. Which aggregator this process is: ``classic`` (the default), ``root`` or
``cluster`` (:class:`flops_utils.contract.training.AggregatorRole`)."""

ROOT_AGGREGATOR_ADDRESS = "FLOPS_ROOT_AGGREGATOR_ADDRESS"
"""Cluster aggregator only: ``HOST:PORT`` of the root aggregator it is a Flower client of."""

CLUSTER = "FLOPS_CLUSTER"
"""Cluster aggregator only: the name of the cluster whose learners it aggregates (the
``cluster`` of their nodes' registration)."""

CLUSTERS = "FLOPS_CLUSTERS"
"""Root aggregator only: comma-separated names of the clusters taking part; the root waits
for ``min(min_available_clients, len(clusters))`` cluster aggregators."""

LEARNERS = "FLOPS_LEARNERS"
"""Cluster aggregator only, optional: comma-separated learner names (node ids) of its
cluster, recorded in its MLflow run."""

LOG_LEVEL = "FLOPS_LOG_LEVEL"
"""Optional. Level of the ``flops`` logger (``DEBUG``, ``INFO`` ...; default ``INFO``); the
manager sets ``DEBUG`` for the services of an SLA with ``"verbose": true``."""

ML_REPO_DIR = "FLOPS_ML_REPO_DIR"
"""Directory holding the user's ML repository (put on ``sys.path``)."""

USER_PYTHON = "FLOPS_USER_PYTHON"
"""Optional. The interpreter of the environment built from the ML repository's dependency
file; the learner and the aggregator run the repository's code with it in a model worker
process (:mod:`flops_utils.model_worker`). Default: the role's own interpreter (one
environment holding both, as in the ``oci`` builder's images)."""

LEARNER_NAME = "FLOPS_LEARNER_NAME"
"""A name for this learner instance (e.g. the node id), used in status messages."""

MLFLOW_URL = "FLOPS_MLFLOW_URL"
"""``http://HOST:PORT`` of the MLflow tracking server the aggregator logs to."""

SLA = "FLOPS_SLA"
"""The project's validated SLA as JSON (``flops_manager.sla.ProjectSLA``), for the aggregator."""

REGISTERED_MODEL = "FLOPS_REGISTERED_MODEL"
"""Optional (classic and root aggregator). The MLflow registered model the final model becomes
a new version of (``flops_utils.contract.tracking.registered_model_name``, chosen by the
manager); default: the experiment's name, ``flops-<project_id>``."""

PROVENANCE = "FLOPS_PROVENANCE"
"""Optional (aggregators). JSON of ``flops_utils.contract.tracking.Provenance``: the
repository, commit, environment or images, the learners' data rows and the project's URL,
which the aggregator records as tags and parameters of its MLflow run."""

CONNECT_TIMEOUT_S = "FLOPS_CONNECT_TIMEOUT_S"
"""Optional. Seconds a learner keeps trying to reach its aggregator, and an aggregator waits
for ``min_available_clients`` learners to connect. Defaults: learner 60, aggregator 300."""

# -- per-project credentials the manager issues to a project's services (docs/security.md) -----

MQTT_USERNAME = "FLOPS_MQTT_USERNAME"
"""Optional. The service's MQTT user name (issued per project and service by the manager;
the broker lets it publish only its own project's, own component's status topics). Unset:
connect anonymously (a broker with authentication refuses that)."""

MQTT_PASSWORD = "FLOPS_MQTT_PASSWORD"
"""The password of :data:`MQTT_USERNAME`."""

TLS_CA_CERT = "FLOPS_TLS_CA_CERT"
"""Optional. PEM of the project's certificate authority (issued by the manager): learners and
cluster aggregators verify their aggregator's certificate with it. Unset: plain gRPC."""

TLS_CERT = "FLOPS_TLS_CERT"
"""Aggregators only, optional: PEM certificate chain of the aggregator's Flower server, signed
by :data:`TLS_CA_CERT`'s authority. Unset: the aggregator serves plain gRPC."""

TLS_KEY = "FLOPS_TLS_KEY"
"""Aggregators only: PEM private key of :data:`TLS_CERT`."""

FLOWER_TOKEN = "FLOPS_FLOWER_TOKEN"
"""Optional. The project's Flower client secret: aggregators accept only Flower clients that
send it, learners and cluster aggregators send it. Unset: no client authentication."""

DATA_TOKEN = "FLOPS_DATA_TOKEN"
"""Learners only, optional: the read-only token (signed by the manager, scoped to the project,
the node and the SLA's data tags) the learner presents to its node's data server."""

DATA_SERVER_CERT = "FLOPS_DATA_SERVER_CERT"
"""Learners only, optional: PEM certificate of the node's data server (registered by it), which
the learner trusts for the TLS connection. Unset: plain gRPC to the data server."""

API_TOKEN = "FLOPS_API_TOKEN"
"""A bearer token of the manager's REST API: the ``flops`` CLI's (admin or customer token) and
the data server's (its node credential, to register its node)."""

MANAGER_TOKEN = "FLOPS_MANAGER_TOKEN"
"""Deprecated name of :data:`API_TOKEN` for the data server; still read, with a warning."""

# -- the image builder service (``flops-image-builder``, see ``image_builder.main``) ----------

ML_REPO_URL = "FLOPS_ML_REPO_URL"
"""The SLA's ``ml_repo_url``: git URL, ``file://`` URL or local path."""

ML_REPO_REF = "FLOPS_ML_REPO_REF"
"""Optional. Branch, tag or commit of the ML repository (default: its default branch)."""

ML_MODEL_FLAVOR = "FLOPS_ML_MODEL_FLAVOR"
"""The SLA's ``ml_model_flavor`` (``sklearn``, ``pytorch``, ...)."""

PLATFORMS = "FLOPS_PLATFORMS"
"""Optional. Comma-separated ``os/arch`` platforms to build for, e.g. ``linux/amd64,linux/arm64``
(default: the building machine's)."""

REGISTRY = "FLOPS_REGISTRY"
"""``host[:port]`` of the OCI registry images are pushed to and pulled from."""

REGISTRY_NAMESPACE = "FLOPS_REGISTRY_NAMESPACE"
"""Optional. Path under the registry for FLOps' images (default ``flops``)."""

REGISTRY_TLS_VERIFY = "FLOPS_REGISTRY_TLS_VERIFY"
"""Optional. ``false`` for a plain-HTTP registry (default ``true``)."""

BASE_IMAGE = "FLOPS_BASE_IMAGE"
"""Reference of the base image with Python 3.11 the images are built from."""

BUILD_CACHE_DIR = "FLOPS_BUILD_CACHE_DIR"
"""Optional. The image builder's locks and build logs."""

BUILD_WORKDIR = "FLOPS_BUILD_WORKDIR"
"""Optional. Scratch directory for the clone and the build context."""

BUILD_RESULT_FILE = "FLOPS_BUILD_RESULT_FILE"
"""Optional. Where the image builder writes its outcome as JSON."""

MODEL_URI = "FLOPS_MODEL_URI"
"""Optional. An MLflow model URI (``models:/<name>/<version>``): the image builder then builds
the trained-model (inference) image of that model."""

STRAGGLER_NOTICE_S = "FLOPS_STRAGGLER_NOTICE_S"
"""Optional (aggregators). Seconds after which, and then every which, a learner that has not
answered the round is reported in a ``straggler`` progress message (default ``min(30,
round_timeout_s / 2)``; 0 turns the notices off)."""

MQTT_DRAIN_TIMEOUT_S = "FLOPS_MQTT_DRAIN_TIMEOUT_S"
"""Optional (every role). Seconds a final status message (and the close of the status
client) waits for the broker to acknowledge what is queued, e.g. while the manager restarts
its embedded broker (default 60)."""
