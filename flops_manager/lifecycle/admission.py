"""Admission: whether an SLA can run, on which nodes, and the new project's record."""

import time
import uuid
from typing import Any

from flops_manager.errors import Conflict, Unprocessable
from flops_manager.records import ClusterRecord, Event, Phase, ProjectRecord
from flops_manager.sla import PostTrainingStep, ProjectSLA, split_userinfo
from flops_utils.contract.lifecycle import ProjectStatus
from flops_utils.contract.services import cluster_aggregator_service
from flops_utils.types import FLOpsMode

NODE_TTL_S = 120.0
"""A node whose data server has not registered for this many seconds is not used."""


class UnsupportedSla(Unprocessable):
    """The SLA asks for something this FLOps does not run yet (HTTP 422)."""

    code = "unsupported_sla"


def eligible_nodes(
    nodes: list[dict[str, Any]],
    data_tags: list[str],
    platforms: list[str] | None = None,
    now: float | None = None,
) -> list[dict[str, Any]]:
    """The live nodes whose data server holds rows under at least one of ``data_tags`` and
    whose ``architecture`` is one of ``platforms`` (``None``: any).

    ``nodes`` are node documents (``tags``: ``{tag: rows}``, ``architecture``: ``linux/amd64``
    …, ``last_seen``: seconds since the epoch); a node not seen for ``NODE_TTL_S`` seconds is
    left out. The result keeps the order.
    """
    now = time.time() if now is None else now
    wanted = set(data_tags)
    return [
        n
        for n in nodes
        if any(n.get("tags", {}).get(t, 0) > 0 for t in wanted)
        and (platforms is None or n.get("architecture", "linux/amd64") in platforms)
        and now - n.get("last_seen", now) <= NODE_TTL_S
    ]


def check_supported(
    sla: ProjectSLA,
    enforces_resources: bool = True,
    produces_images: bool = True,
    serves_models: bool = True,
    *,
    builds_model_images: bool | None = None,
    serves_without_image: bool | None = None,
) -> None:
    """Raise :class:`UnsupportedSla` for an SLA field this FLOps would otherwise accept
    without honouring it.

    Refused: ``use_devel_base_images: true`` (FLOps builds every image from one base image,
    ``FLOPS_BASE_IMAGE``, and has no devel variant); ``resource_constraints`` given
    explicitly when the orchestrator cannot limit services (``enforces_resources`` False: the
    ``local`` backend runs plain processes); a ``post_training_steps`` entry the manager
    cannot run (:func:`check_post_training`). ``produces_images``: the builder makes the
    learner's and aggregator's images; ``builds_model_images`` (default: ``produces_images``):
    it builds trained-model images (:func:`flops_manager.builds.builds_model_images`);
    ``serves_models``: the orchestrator runs a trained-model server; ``serves_without_image``
    (default: ``not produces_images``, since an orchestrator paired with a builder of no
    images runs none, so one that serves models serves the MLflow model itself): it needs no
    image for that. ``verbose`` is honoured (services log at DEBUG).
    """
    if sla.use_devel_base_images:
        raise UnsupportedSla(
            "use_devel_base_images is not supported: FLOps builds the learner and aggregator "
            "from one base image (FLOPS_BASE_IMAGE) and has no devel variant. Remove the field "
            'or set it to false; to debug, set "verbose": true (services log at DEBUG).'
        )
    if "resource_constraints" in sla.model_fields_set and not enforces_resources:
        raise UnsupportedSla(
            "resource_constraints cannot be honoured by this manager's orchestrator: the "
            "local orchestrator runs the services as plain processes on this machine and "
            "cannot limit their memory, CPUs or storage. Remove resource_constraints, or run "
            "the manager with FLOPS_ORCHESTRATOR=oakestra."
        )
    check_post_training(
        sla.post_training_steps,
        produces_images if builds_model_images is None else builds_model_images,
        serves_models,
        (not produces_images) if serves_without_image is None else serves_without_image,
    )


def check_post_training(
    steps: list[PostTrainingStep],
    builds_model_images: bool,
    serves_models: bool,
    serves_without_image: bool,
) -> None:
    """Refuse the post-training steps this manager's builder and orchestrator cannot run.

    ``build_image_for_trained_model`` needs a builder of trained-model images
    (``builds_model_images``); ``deploy_trained_model_image`` an orchestrator that
    ``serves_models``, from the image (then the image must be buildable) or, when it
    ``serves_without_image``, from the MLflow model. Raises :class:`UnsupportedSla` naming
    the settings that would make the step run.
    """
    if PostTrainingStep.BUILD_IMAGE_FOR_TRAINED_MODEL in steps and not builds_model_images:
        raise UnsupportedSla(
            "post_training_steps: build_image_for_trained_model cannot run on this manager: "
            f"it has no image builder for trained-model images{_missing_here()}. Install "
            "buildah, docker-registry and debootstrap (Debian packages; the manager then runs "
            "its own registry, unless FLOPS_EMBEDDED_REGISTRY=false, and makes the base "
            "image) and restart it, or set FLOPS_REGISTRY "
            "(host:port of a registry) and FLOPS_BASE_IMAGE (a Python 3.11 image in it), or "
            "remove the step (the trained model is registered in MLflow either way; "
            "deploy_trained_model_image alone serves it on this machine)."
        )
    if PostTrainingStep.DEPLOY_TRAINED_MODEL_IMAGE not in steps:
        return
    if not serves_models:
        raise UnsupportedSla(
            "post_training_steps: deploy_trained_model_image cannot run on this manager: its "
            "orchestrator does not run trained-model servers. Keep only "
            "build_image_for_trained_model (the record's model_image names the image to run "
            "yourself), or run the manager with FLOPS_ORCHESTRATOR=local or oakestra."
        )
    if not serves_without_image and not builds_model_images:
        raise UnsupportedSla(
            "post_training_steps: deploy_trained_model_image cannot run on this manager: its "
            "orchestrator runs the trained model from an image and the manager builds none"
            f"{_missing_here()}. Set FLOPS_REGISTRY and FLOPS_BASE_IMAGE (and install buildah)."
        )


def _missing_here() -> str:
    """`` (missing here: buildah, ...)`` naming what this machine lacks for the embedded
    registry and base image (:mod:`flops_manager.embedded_registry`,
    :mod:`flops_manager.base_image`); ``""`` when nothing is missing."""
    from flops_manager.base_image import missing_requirements
    from flops_manager.embedded_registry import missing_tools

    missing = dict.fromkeys([*missing_tools(), *missing_requirements()])
    return f" (missing here: {', '.join(missing)})" if missing else ""


def admit(sla: ProjectSLA, nodes: list[dict[str, Any]], now_s: float) -> ProjectRecord:
    """The ``pending`` record of a new project with ``sla`` over the registered ``nodes``:
    classic FL runs a learner on each node :func:`choose_nodes` picks; hierarchical FL one
    per node of each cluster :func:`choose_clusters` picks. Raises ``Conflict`` as those do."""
    if sla.training_configuration.mode is FLOpsMode.HIERARCHICAL:
        clusters = choose_clusters(sla, nodes, now_s)
        members = {name: [str(n["node_id"]) for n in ns] for name, ns in clusters.items()}
        node_ids = [node for ids in members.values() for node in ids]
        return new_record(sla, node_ids, now_s, members)
    return new_record(sla, [str(n["node_id"]) for n in choose_nodes(sla, nodes, now_s)], now_s)


def choose_nodes(
    sla: ProjectSLA, nodes: list[dict[str, Any]], now_s: float
) -> list[dict[str, Any]]:
    """The nodes the SLA's learners run on, from the registered node documents ``nodes``.

    Raises ``Conflict`` when fewer nodes hold the SLA's data tags on a supported platform
    than ``min_available_clients`` (details list every node's tags). With ``max_clients``,
    that many eligible nodes are chosen, most rows first.
    """
    training = sla.training_configuration
    platforms = [p.value for p in sla.supported_platforms]
    eligible = eligible_nodes(nodes, training.data_tags, platforms, now_s)
    if len(eligible) < training.min_available_clients:
        raise Conflict(
            f"{len(eligible)} worker node(s) of {'/'.join(platforms)} hold data tagged "
            f"{training.data_tags}, but min_available_clients is "
            f"{training.min_available_clients}. Register more nodes with that data (e.g. "
            "POST /api/flops/mocks), add their platform to supported_platforms, or lower "
            "min_available_clients.",
            details=[
                {
                    "node_id": n["node_id"],
                    "architecture": n.get("architecture"),
                    "tags": n.get("tags", {}),
                }
                for n in nodes
            ],
        )
    return _at_most(eligible, training.max_clients, training.data_tags)


def _at_most(
    nodes: list[dict[str, Any]], max_clients: int | None, data_tags: list[str]
) -> list[dict[str, Any]]:
    """``nodes``, or with ``max_clients`` that many of them, most rows under ``data_tags``
    first."""
    if max_clients is None:
        return nodes
    rows = {n["node_id"]: sum(n.get("tags", {}).get(t, 0) for t in data_tags) for n in nodes}
    return sorted(nodes, key=lambda n: -rows[n["node_id"]])[:max_clients]


def cluster_of(node: dict[str, Any]) -> str:
    """The cluster a node registered under (``local`` when it gave none)."""
    return str(node.get("cluster") or "local")


def choose_clusters(
    sla: ProjectSLA, nodes: list[dict[str, Any]], now_s: float
) -> dict[str, list[dict[str, Any]]]:
    """Hierarchical FL: the clusters that take part and the nodes their learners run on,
    ``{cluster: [node document, ...]}`` in cluster-name order.

    The eligible nodes (data tags, platforms, liveness as in :func:`choose_nodes`) are
    grouped by their registered ``cluster``; a cluster with fewer eligible nodes than
    ``min_available_clients`` (which counts learners per cluster) does not take part;
    ``max_clients`` applies per cluster (most rows first). Raises ``Conflict`` when no
    cluster can take part; its details list every cluster with its eligible nodes and the
    tags of each of its nodes.
    """
    training = sla.training_configuration
    platforms = [p.value for p in sla.supported_platforms]
    eligible = eligible_nodes(nodes, training.data_tags, platforms, now_s)
    grouped: dict[str, list[dict[str, Any]]] = {}
    for node in eligible:
        grouped.setdefault(cluster_of(node), []).append(node)
    needed = training.min_available_clients
    able = {
        name: _at_most(members, training.max_clients, training.data_tags)
        for name, members in sorted(grouped.items())
        if len(members) >= needed
    }
    if able:
        return able
    clusters = sorted({cluster_of(n) for n in nodes})
    raise Conflict(
        f"No cluster can take part in hierarchical training: each needs at least "
        f"min_available_clients ({needed}) live nodes of {'/'.join(platforms)} holding data "
        f"tagged {training.data_tags}, and the clusters have "
        + (
            ", ".join(f"{c}: {len(grouped.get(c, []))}" for c in clusters)
            if clusters
            else "no nodes at all"
        )
        + ". Register more nodes with that data in one cluster (data server --cluster), "
        "lower min_available_clients, or use mode 'classic'.",
        details=[
            {
                "cluster": c,
                "eligible_nodes": [str(n["node_id"]) for n in grouped.get(c, [])],
                "nodes": [
                    {
                        "node_id": n["node_id"],
                        "architecture": n.get("architecture"),
                        "tags": n.get("tags", {}),
                    }
                    for n in nodes
                    if cluster_of(n) == c
                ],
            }
            for c in clusters
        ],
    )


def new_record(
    sla: ProjectSLA,
    node_ids: list[str],
    now_s: float,
    clusters: dict[str, list[str]] | None = None,
) -> ProjectRecord:
    """The ``pending`` record of a newly accepted project (a fresh 12-hex id) whose learners
    run on ``node_ids``; hierarchical FL: ``clusters`` maps each cluster taking part to its
    learners' node ids."""
    project_id = uuid.uuid4().hex[:12]
    pending = ProjectStatus.PENDING
    stored = sla.model_dump(mode="json")
    stored["ml_repo_url"], userinfo = split_userinfo(sla.ml_repo_url)
    return ProjectRecord(
        _id=project_id,
        project_id=project_id,
        customer_id=sla.customerID,
        status=pending,
        status_message="accepted",
        created_at=now_s,
        updated_at=now_s,
        sla=stored,
        repo_userinfo=userinfo,
        nodes=node_ids,
        clusters=[
            ClusterRecord(name=name, service=cluster_aggregator_service(name), nodes=members)
            for name, members in (clusters or {}).items()
        ],
        phases={pending.value: Phase(started_at=now_s)},
        events=[
            Event(timestamp=now_s, type="status", status=pending.value, message="project accepted")
        ],
    )
