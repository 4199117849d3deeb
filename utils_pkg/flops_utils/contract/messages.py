"""The status messages the runtime roles publish on ``flops/<project_id>/<component>/<status>``
(:mod:`flops_utils.contract.topics`), as versioned pydantic models.

Every payload is a :class:`StatusMessage` envelope in JSON (``v`` = :data:`MESSAGE_VERSION`;
a payload without ``v`` is version 1); its ``data`` holds the model :func:`data_model` names
for the component, status and (aggregator progress) stage:

===========================  ===========================================================
topic's component/status     ``data``
===========================  ===========================================================
aggregator/started           :class:`AggregatorStarted`
aggregator/progress          :class:`RoundProgress` (``stage`` ``round``, the default),
                             :class:`TrainingDone` (``stage`` ``training_done``),
                             :class:`Straggler` (``stage`` ``straggler``) or
                             :class:`LearnersDropped` (``stage`` ``learners_dropped``)
aggregator/success           :class:`AggregatorSuccess`
cluster-aggregator/started   :class:`AggregatorStarted` (``role`` ``cluster``, ``cluster``)
cluster-aggregator/progress  :class:`RoundProgress` (``cycle``, ``step``, ``cluster``),
                             :class:`Straggler` or :class:`LearnersDropped` (by ``stage``)
cluster-aggregator/success   :class:`ClusterAggregatorSuccess`
learner/started              :class:`LearnerStarted`
learner/success              :class:`LearnerSuccess`
builder/started              :class:`BuilderStarted`
builder/progress             :class:`BuilderProgress`
builder/success              :class:`BuilderSuccess`
any/failed                   :class:`Failed`
===========================  ===========================================================

Data models accept keys they do not name (kept as extra fields), so that a field added
within version 1 does not break an older reader; their fields are optional so that a reader
checks types, not completeness. The manager calls :func:`parse_status_message`.
"""

import json
import time
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from flops_utils.contract.lifecycle import Stage
from flops_utils.contract.topics import parse_status_topic
from flops_utils.contract.training import describe_validation_error
from flops_utils.types import Component, ComponentStatus

__all__ = [
    "MESSAGE_VERSION",
    "AggregatorStarted",
    "AggregatorSuccess",
    "BuilderProgress",
    "BuilderStarted",
    "BuilderSuccess",
    "ClusterAggregatorSuccess",
    "Failed",
    "LearnerStarted",
    "LearnerSuccess",
    "LearnersDropped",
    "MessageData",
    "RoundProgress",
    "StatusMessage",
    "Straggler",
    "TrainingDone",
    "data_model",
    "parse_status_message",
    "parse_status_payload",
]

MESSAGE_VERSION: Final = 1
"""The version of the payloads this package writes and reads."""


class MessageData(BaseModel):
    """Base of the ``data`` models; also the model of a message without a specific one
    (any JSON object)."""

    model_config = ConfigDict(extra="allow", frozen=True)


class AggregatorStarted(MessageData):
    """The Flower server listens: ``address`` (``HOST:PORT`` bound), ``rounds`` planned,
    ``strategy`` (``{"name", ...every parameter in effect}``)."""

    address: str | None = None
    rounds: int | None = None
    strategy: dict[str, Any] | None = None
    role: str | None = None
    """``classic``, ``root`` or ``cluster`` (:class:`~flops_utils.contract.training.
    AggregatorRole`); absent means classic."""
    cycles: int | None = None
    """Hierarchical FL: the cycles planned (root and cluster aggregators)."""
    cluster: str | None = None
    """Cluster aggregator: its cluster."""


class RoundProgress(MessageData):
    """A round ended: its number ``round`` of ``rounds``, the weighted ``loss`` and
    ``accuracy``, how many ``learners`` took part and its wall time in ``seconds``."""

    stage: Literal[Stage.ROUND] = Stage.ROUND
    round: int | None = None
    rounds: int | None = None
    loss: float | None = None
    accuracy: float | None = None
    learners: int | None = None
    seconds: float | None = None
    cycle: int | None = None
    """Hierarchical FL: the root's cycle this round belongs to (for the root, ``round`` is
    the cycle and ``learners`` the cluster aggregators that took part)."""
    step: int | None = None
    """Cluster aggregator: the round's global step, ``(cycle - 1) * rounds + round``."""
    cluster: str | None = None
    """Cluster aggregator: its cluster."""
    fit_examples: int | None = None
    """Training examples aggregated in this round (the sum over its learners)."""
    evaluate_examples: int | None = None
    """Evaluation examples the ``loss`` and ``accuracy`` are weighted over."""


class ClusterAggregatorSuccess(MessageData):
    """A cluster aggregator finished (the root ended training): its ``cluster``, MLflow
    child ``run_id``, the ``cycles`` it took part in, its ``rounds`` in total and its wall
    time in ``seconds``."""

    cluster: str | None = None
    run_id: str | None = None
    cycles: int | None = None
    rounds: int | None = None
    seconds: float | None = None


class TrainingDone(MessageData):
    """The last round ended (``rounds`` of them, the last ``loss`` and ``accuracy``); the
    aggregator logs the model next, so the project enters ``post_training``."""

    stage: Literal[Stage.TRAINING_DONE]
    rounds: int | None = None
    loss: float | None = None
    accuracy: float | None = None


class Straggler(MessageData):
    """A ``learner`` (its name; a cluster aggregator's cluster at the root) has not answered
    the ``phase`` (``training`` or ``evaluation``) instruction of ``round`` for ``waited_s``
    seconds; ``round_timeout_s`` is when the round drops it. A cluster aggregator adds its
    ``cycle`` and ``cluster``. Not a round's result: ``round`` is the round still running."""

    stage: Literal[Stage.STRAGGLER]
    learner: str | None = None
    round: int | None = None
    phase: str | None = None
    waited_s: float | None = None
    round_timeout_s: float | None = None
    cycle: int | None = None
    cluster: str | None = None


class LearnersDropped(MessageData):
    """The ``phase`` of ``round`` ended without the results of ``learners`` (names): they
    failed, disconnected or, with ``timed_out``, exceeded ``round_timeout_s``. ``remaining``
    results came back, the SLA ``needed`` that many; ``going_on`` says whether training goes
    on (else the aggregator fails next). A cluster aggregator adds ``cycle`` and ``cluster``."""

    stage: Literal[Stage.LEARNERS_DROPPED]
    round: int | None = None
    phase: str | None = None
    learners: list[str] | None = None
    timed_out: bool | None = None
    remaining: int | None = None
    needed: int | None = None
    going_on: bool | None = None
    cycle: int | None = None
    cluster: str | None = None


class AggregatorSuccess(MessageData):
    """Training finished and the model is registered: the MLflow ``experiment_id`` and
    ``run_id``, the logged ``model_uri``, the ``registered_model`` with its
    ``model_version`` and ``registered_model_uri`` (``models:/<name>/<version>``), the final
    ``loss``/``accuracy``, ``rounds`` and the wall time in ``seconds``."""

    experiment_id: str | None = None
    run_id: str | None = None
    model_uri: str | None = None
    registered_model: str | None = None
    model_version: int | None = None
    registered_model_uri: str | None = None
    loss: float | None = None
    accuracy: float | None = None
    rounds: int | None = None
    seconds: float | None = None


class LearnerStarted(MessageData):
    """A learner started: the ``aggregator`` it connects to (``HOST:PORT``) and its
    ``data_tags``."""

    aggregator: str | None = None
    data_tags: list[str] | None = None


class LearnerSuccess(MessageData):
    """A learner finished: ``fit_rounds`` and ``evaluate_rounds`` served, ``num_examples`` of
    its last fit, its last ``loss``/``accuracy`` and its wall time in ``seconds``."""

    fit_rounds: int | None = None
    evaluate_rounds: int | None = None
    num_examples: int | None = None
    loss: float | None = None
    accuracy: float | None = None
    seconds: float | None = None


class Failed(MessageData):
    """A role failed: ``error`` is the machine-readable error name (e.g. ``user_code_error``),
    ``exit_code`` the :class:`~flops_utils.contract.exit_codes.ExitCode` it exits with,
    ``cause`` what it depends on that went away (if that is why); the envelope's ``message``
    says what happened and how to fix it."""

    error: str | None = None
    exit_code: int | None = None
    cause: str | None = None
    """Set when the role failed because something it depends on went away, not by its own
    fault: ``aggregator_unreachable`` (a learner lost or never reached its aggregator, a
    cluster aggregator its root aggregator), ``tracking_server_unreachable`` (an aggregator's
    MLflow tracking server did not answer). Absent otherwise."""


class BuilderStarted(MessageData):
    """An image build started; the inputs: ``ml_repo_url``/``ml_repo_ref``/``flavor``/
    ``platforms`` for training images, ``model_uri`` for a trained-model image, and the
    ``registry`` and ``base_image``."""

    ml_repo_url: str | None = None
    ml_repo_ref: str | None = None
    model_uri: str | None = None
    flavor: str | None = None
    platforms: list[str] | None = None
    registry: str | None = None
    base_image: str | None = None


class BuilderProgress(MessageData):
    """A milestone of a build: ``step`` (an ``image_builder`` ``BuildStep``), its wall time
    in ``seconds`` and the step's own data (extra fields)."""

    step: str | None = None
    seconds: float | None = None


class BuilderSuccess(MessageData):
    """The build's outcome (the image builder's result document): ``key``, ``commit``,
    ``cache_hit``, ``seconds``, ``platforms``, ``images`` (``{role: {"repository", "tag",
    "digest", "ref", "reused", "seconds", ...}}``); for a trained-model image also
    ``model_uri`` and ``port``."""

    status: Literal["success"] = "success"
    key: str | None = None
    commit: str | None = None
    cache_hit: bool | None = None
    seconds: float | None = None
    platforms: list[str] | None = None
    images: dict[str, dict[str, Any]] | None = None
    model_uri: str | None = None
    port: int | None = None


_DATA_MODELS: dict[tuple[Component, ComponentStatus], type[MessageData]] = {
    (Component.AGGREGATOR, ComponentStatus.STARTED): AggregatorStarted,
    (Component.AGGREGATOR, ComponentStatus.SUCCESS): AggregatorSuccess,
    (Component.CLUSTER_AGGREGATOR, ComponentStatus.STARTED): AggregatorStarted,
    (Component.CLUSTER_AGGREGATOR, ComponentStatus.PROGRESS): RoundProgress,
    (Component.CLUSTER_AGGREGATOR, ComponentStatus.SUCCESS): ClusterAggregatorSuccess,
    (Component.LEARNER, ComponentStatus.STARTED): LearnerStarted,
    (Component.LEARNER, ComponentStatus.SUCCESS): LearnerSuccess,
    (Component.BUILDER, ComponentStatus.STARTED): BuilderStarted,
    (Component.BUILDER, ComponentStatus.PROGRESS): BuilderProgress,
    (Component.BUILDER, ComponentStatus.SUCCESS): BuilderSuccess,
}

_STAGE_MODELS: dict[str, type[MessageData]] = {
    Stage.ROUND.value: RoundProgress,
    Stage.TRAINING_DONE.value: TrainingDone,
    Stage.STRAGGLER.value: Straggler,
    Stage.LEARNERS_DROPPED.value: LearnersDropped,
}

_CLUSTER_STAGES = frozenset(
    {Stage.ROUND.value, Stage.STRAGGLER.value, Stage.LEARNERS_DROPPED.value}
)
"""The progress stages of a cluster aggregator."""


def data_model(
    component: Component, status: ComponentStatus, data: dict[str, Any] | None = None
) -> type[MessageData]:
    """The model of the ``data`` of a ``component``/``status`` message (``data`` picks the
    (cluster) aggregator's progress stage; no ``stage`` means ``round``); :class:`MessageData`
    when the pair has no specific model. Raises ``ValueError`` for an unknown stage."""
    if status is ComponentStatus.FAILED:
        return Failed
    if status is ComponentStatus.PROGRESS and component in (
        Component.AGGREGATOR,
        Component.CLUSTER_AGGREGATOR,
    ):
        stages = _CLUSTER_STAGES if component is Component.CLUSTER_AGGREGATOR else _STAGE_MODELS
        stage = (data or {}).get("stage", Stage.ROUND.value)
        if stage not in stages:
            raise ValueError(
                f"unknown {component.value} progress stage {stage!r}; expected one of "
                f"{', '.join(sorted(stages))}"
            )
        return _STAGE_MODELS[stage]
    return _DATA_MODELS.get((component, status), MessageData)


class StatusMessage(BaseModel):
    """One status message (version :data:`MESSAGE_VERSION`).

    ``project_id``, ``component`` and ``status`` repeat the topic's parts; ``instance`` names
    the publisher (``learner``'s node name, else the component); ``message`` is one line for
    people; ``data`` the JSON object of :meth:`typed_data`; ``timestamp`` seconds since the
    epoch at the publisher.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    v: Literal[1] = MESSAGE_VERSION
    project_id: str = Field(min_length=1)
    component: Component
    status: ComponentStatus
    instance: str = ""
    message: str = ""
    data: dict[str, Any] = Field(default_factory=dict)
    timestamp: float = Field(default_factory=time.time)

    @classmethod
    def build(
        cls,
        project_id: str,
        component: Component,
        status: ComponentStatus,
        *,
        instance: str = "",
        message: str = "",
        data: MessageData | dict[str, Any] | None = None,
    ) -> "StatusMessage":
        """A message stamped now, ``data`` checked against :func:`data_model` (a dict is
        validated, a model dumped). Raises ``ValueError`` when ``data`` does not fit."""
        document = _validated_data(component, status, data)
        return cls(
            project_id=project_id,
            component=component,
            status=status,
            instance=instance,
            message=message,
            data=document,
        )

    def typed_data(self) -> MessageData:
        """``data`` as its :func:`data_model`. Raises ``ValueError`` when it does not fit."""
        model = data_model(self.component, self.status, self.data)
        try:
            return model.model_validate(self.data)
        except ValidationError as exc:
            raise ValueError(f"data: {describe_validation_error(exc)}") from None

    def payload(self) -> bytes:
        """The JSON payload to publish."""
        return self.model_dump_json().encode()


def _validated_data(
    component: Component, status: ComponentStatus, data: MessageData | dict[str, Any] | None
) -> dict[str, Any]:
    if isinstance(data, MessageData):
        document = data.model_dump(mode="json", exclude_unset=True)
    else:
        document = dict(data or {})
    model = data_model(component, status, document)
    try:
        return model.model_validate(document).model_dump(mode="json", exclude_unset=True)
    except ValidationError as exc:
        raise ValueError(f"data: {describe_validation_error(exc)}") from None


def parse_status_payload(payload: bytes | str | dict[str, Any]) -> StatusMessage:
    """Validate one status message payload (JSON bytes/text, or its decoded object), its
    ``data`` included.

    Raises ``ValueError`` naming the problem: not JSON, not an object, a version other than
    :data:`MESSAGE_VERSION` (a payload without ``v`` is version 1), a missing or malformed
    field (by its path), or ``data`` that does not fit its model.
    """
    document = payload if isinstance(payload, dict) else _decode(payload)
    version = document.get("v", MESSAGE_VERSION)
    if version != MESSAGE_VERSION or isinstance(version, bool):
        raise ValueError(
            f"message version {version!r} is not supported (this reader understands version "
            f"{MESSAGE_VERSION}); run the same FLOps version for the manager and its services"
        )
    try:
        message = StatusMessage.model_validate(document)
    except ValidationError as exc:
        raise ValueError(describe_validation_error(exc)) from None
    message.typed_data()
    return message


def parse_status_message(topic: str, payload: bytes | str) -> StatusMessage:
    """The :class:`StatusMessage` published on ``topic`` with ``payload``.

    ``project_id``, ``component`` and ``status`` default to the topic's parts and must match
    them when present. Raises ``ValueError`` with the reason: a topic that is not
    ``flops/<project_id>/<component>/<status>``, a payload refused by
    :func:`parse_status_payload`, or a payload that contradicts its topic.
    """
    parsed = parse_status_topic(topic)
    if parsed is None:
        raise ValueError(
            f"topic {topic!r} is not a FLOps status topic (flops/<project_id>/<component>/<status>)"
        )
    document = _decode(payload)
    from_topic = {
        "project_id": parsed.project_id,
        "component": parsed.component.value,
        "status": parsed.status.value,
    }
    for key, expected in from_topic.items():
        given = document.setdefault(key, expected)
        if given != expected:
            raise ValueError(f"payload {key} {given!r} contradicts the topic's {expected!r}")
    return parse_status_payload(document)


def _decode(payload: bytes | str) -> dict[str, Any]:
    try:
        document = json.loads(payload or b"{}")
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"payload is not JSON ({exc})") from None
    if not isinstance(document, dict):
        raise ValueError(f"payload is a JSON {type(document).__name__}, not an object")
    return document
