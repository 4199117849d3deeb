"""The training configuration the manager validates and the aggregator runs: data tags, the
Flower strategy models, :class:`TrainingConfiguration`, and :class:`AggregatorSLA` (the part of
the SLA the aggregator reads from ``FLOPS_SLA``).

The manager's SLA (``flops_manager.sla``) re-exports these; the aggregator imports them from
here, so that no runtime image needs the manager's code.
"""

from collections.abc import Mapping
from enum import StrEnum
from typing import Annotated, Any, Literal, Self, get_args

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from flops_utils.types import FLOpsMode, MLModelFlavor

__all__ = [
    "CLIENT_NAME_PROPERTY",
    "DEFAULT_STRATEGY",
    "STRATEGY_ADAPTER",
    "STRATEGY_NAMES",
    "TAG_PATTERN",
    "AggregatorSLA",
    "DataTag",
    "FedAdagradConfig",
    "FedAdamConfig",
    "FedAvgConfig",
    "FedMedianConfig",
    "FedProxConfig",
    "FedTrimmedAvgConfig",
    "FedYogiConfig",
    "StrategyConfig",
    "TrainingConfiguration",
    "describe_validation_error",
]

CLIENT_NAME_PROPERTY = "flops_name"
"""Key of the name a Flower client of an aggregator returns from ``get_properties``: a
learner's ``FLOPS_LEARNER_NAME``, a cluster aggregator's cluster. The aggregator asks once per
connection and names the client so in its messages (stragglers, dropped learners)."""

TAG_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,62}$"
"""Data tags: the rule the data servers enforce (lower case, digits, ``_.-``; 1-63 chars)."""

DataTag = Annotated[str, StringConstraints(pattern=TAG_PATTERN)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _StrategyConfig(_Strict):
    """Base of the strategy models: ``name`` is the Flower class, the other fields are its
    constructor's keyword arguments under the same names; NaN and infinities are rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    def flower_kwargs(self) -> dict[str, Any]:
        """The parameters as keyword arguments for the Flower strategy class ``name``."""
        return self.model_dump(exclude={"name"})


def _eta(default: float) -> Any:
    return Field(
        default=default,
        gt=0,
        le=10,
        description=f"Server-side learning rate: the step the aggregator takes along its "
        f"adaptive update of the global model (0 < eta <= 10). Flower's default: {default:g}.",
    )


def _eta_l(default: float) -> Any:
    return Field(
        default=default,
        gt=0,
        le=10,
        description=f"Client-side learning rate in Flower's API (0 < eta_l <= 10). Flower "
        f"stores it but neither uses it nor sends it to the learners, so in FLOps it is only "
        f"recorded (the repository's fit_model sets its own learning rate). Flower's default: "
        f"{default:g}.",
    )


def _tau(default: float) -> Any:
    return Field(
        default=default,
        gt=0,
        le=1,
        description=f"Controls the degree of adaptivity: added to the square root of the "
        f"second moment before dividing, so larger values make the update less adaptive "
        f"(0 < tau <= 1). Flower's default: {default:g}.",
    )


def _beta_1(default: float) -> Any:
    return Field(
        default=default,
        ge=0,
        lt=1,
        description=f"Momentum: decay of the running average of the averaged updates "
        f"(0 <= beta_1 < 1). Flower's default: {default:g}.",
    )


def _beta_2(default: float) -> Any:
    return Field(
        default=default,
        ge=0,
        lt=1,
        description=f"Second-moment decay: decay of the running estimate of the squared "
        f"averaged updates (0 <= beta_2 < 1). Flower's default: {default:g}.",
    )


class FedAvgConfig(_StrategyConfig):
    """FedAvg (McMahan et al., 2017), the default: the new global model is the average of
    the learners' models weighted by their training sample counts. No parameters."""

    name: Literal["FedAvg"]


class FedProxConfig(_StrategyConfig):
    """FedProx (Li et al., 2020): aggregates like FedAvg and sends ``proximal_mu`` to every
    learner in the fit config (``config["proximal_mu"]``). Training benefits only if the
    repository's ``fit_model`` adds the proximal term ``proximal_mu / 2 * ||w - w_global||^2``
    to its loss (``w_global``: the parameters received for the round). The FLOps learner does
    not yet pass the fit config to the ModelManager (``fit_model()`` takes no arguments), so
    until it does FedProx trains exactly like FedAvg."""

    name: Literal["FedProx"]
    proximal_mu: float = Field(
        ge=0,
        le=1000,
        description="Weight of the proximal term (0 <= proximal_mu <= 1000; required, Flower "
        "has no default). 0 makes FedProx equivalent to FedAvg; larger values keep the "
        "learners' models closer to the global model.",
    )


class FedAdamConfig(_StrategyConfig):
    """FedAdam (Reddi et al., 2021, "Adaptive Federated Optimization"): the aggregator
    treats the difference between the FedAvg aggregate and the current global model as a
    pseudo-gradient and applies Adam to it (momentum ``beta_1``, second moment ``beta_2``,
    bias-corrected step ``eta``)."""

    name: Literal["FedAdam"]
    eta: float = _eta(0.1)
    eta_l: float = _eta_l(0.1)
    beta_1: float = _beta_1(0.9)
    beta_2: float = _beta_2(0.99)
    tau: float = _tau(1e-9)


class FedYogiConfig(_StrategyConfig):
    """FedYogi (Reddi et al., 2021): like FedAdam, but the second moment follows Yogi's
    sign-controlled additive update, which grows more slowly than Adam's."""

    name: Literal["FedYogi"]
    eta: float = _eta(0.01)
    eta_l: float = _eta_l(0.0316)
    beta_1: float = _beta_1(0.9)
    beta_2: float = _beta_2(0.99)
    tau: float = _tau(1e-3)


class FedAdagradConfig(_StrategyConfig):
    """FedAdagrad (Reddi et al., 2021): Adagrad on the pseudo-gradient (FedAvg aggregate
    minus the current global model); the second moment is the sum of all past squared
    pseudo-gradients. Flower fixes beta_1 and beta_2 at 0 for it."""

    name: Literal["FedAdagrad"]
    eta: float = _eta(0.1)
    eta_l: float = _eta_l(0.1)
    tau: float = _tau(1e-9)


class FedMedianConfig(_StrategyConfig):
    """FedMedian (Yin et al., 2018): each parameter of the new global model is the
    coordinate-wise median of the learners' values (sample counts are ignored); robust to a
    minority of outlying or faulty learners. No parameters."""

    name: Literal["FedMedian"]


class FedTrimmedAvgConfig(_StrategyConfig):
    """FedTrimmedAvg (Yin et al., 2018): each parameter is the coordinate-wise mean of the
    learners' values after dropping the ``beta`` fraction of the lowest and of the highest
    ones (sample counts are ignored). With n learners, ``floor(beta * n)`` values are cut at
    each end, so with few learners a small ``beta`` cuts nothing."""

    name: Literal["FedTrimmedAvg"]
    beta: float = Field(
        default=0.2,
        ge=0,
        lt=0.5,
        description="Fraction cut off at each end of the sorted values (0 <= beta < 0.5). "
        "Flower's default: 0.2.",
    )


_StrategyUnion = Annotated[
    FedAvgConfig
    | FedProxConfig
    | FedAdamConfig
    | FedYogiConfig
    | FedAdagradConfig
    | FedMedianConfig
    | FedTrimmedAvgConfig,
    Field(discriminator="name"),
]

STRATEGY_NAMES: tuple[str, ...] = tuple(
    get_args(model.model_fields["name"].annotation)[0]
    for model in get_args(get_args(_StrategyUnion)[0])
)
"""Every valid ``strategy.name``: ``FedAvg``, ``FedProx``, ``FedAdam``, ``FedYogi``,
``FedAdagrad``, ``FedMedian``, ``FedTrimmedAvg``; each is a class in ``flwr.server.strategy``."""


def _require_name(value: Any) -> Any:
    """Name the valid strategies when ``name`` is missing (pydantic only says it is)."""
    if isinstance(value, Mapping) and "name" not in value:
        raise ValueError(f"a strategy needs a 'name', one of {', '.join(STRATEGY_NAMES)}")
    return value


StrategyConfig = Annotated[_StrategyUnion, BeforeValidator(_require_name)]
"""``training_configuration.strategy``: one of the models above, chosen by ``name`` (the
Flower strategy class); an unknown or missing name is rejected with the list of valid ones."""

DEFAULT_STRATEGY = FedAvgConfig(name="FedAvg")
"""The strategy of an SLA without ``training_configuration.strategy``."""

STRATEGY_ADAPTER: TypeAdapter[StrategyConfig] = TypeAdapter(StrategyConfig)
"""Validates a ``training_configuration.strategy`` object on its own (the aggregator uses it)."""


class TrainingConfiguration(_Strict):
    """How training runs. ``training_rounds``: Flower rounds; ``training_cycles``: rounds of
    the root aggregator in hierarchical mode (each cycle runs ``training_rounds`` at the
    cluster aggregators). ``strategy`` (an extension): the Flower strategy the aggregator
    runs, ``{"name": "FedProx", "proximal_mu": 0.1}`` for example; FedAvg when missing."""

    mode: FLOpsMode = FLOpsMode.CLASSIC
    data_tags: list[DataTag] = Field(default_factory=lambda: ["mnist"], min_length=1, max_length=64)
    training_cycles: int = Field(default=1, ge=1, le=1000)
    training_rounds: int = Field(default=3, ge=1, le=10000)
    min_available_clients: int = Field(default=1, ge=1, le=10000)
    min_fit_clients: int = Field(default=1, ge=1, le=10000)
    min_evaluate_clients: int = Field(default=1, ge=1, le=10000)
    round_timeout_s: float | None = Field(default=None, gt=0, le=86400)
    max_clients: int | None = Field(default=None, ge=1, le=10000)
    """An extension: at most this many learners (the eligible nodes with the most rows under
    the SLA's tags); every eligible node when missing."""
    strategy: StrategyConfig = DEFAULT_STRATEGY

    @model_validator(mode="after")
    def _client_counts(self) -> Self:
        for name in ("min_fit_clients", "min_evaluate_clients"):
            if getattr(self, name) > self.min_available_clients:
                raise ValueError(
                    f"{name} ({getattr(self, name)}) exceeds min_available_clients "
                    f"({self.min_available_clients}); raise min_available_clients or lower it"
                )
        if self.max_clients is not None and self.max_clients < self.min_available_clients:
            raise ValueError(
                f"max_clients ({self.max_clients}) is below min_available_clients "
                f"({self.min_available_clients}); raise max_clients or lower the minimum"
            )
        return self


class AggregatorRole(StrEnum):
    """The three aggregator roles (``FLOPS_AGGREGATOR_ROLE``).

    ``classic``: a Flower server over the learners for ``training_rounds`` rounds. ``root``
    (hierarchical FL): a Flower server over the cluster aggregators for ``training_cycles``
    rounds (cycles). ``cluster`` (hierarchical FL): a Flower client of the root and a Flower
    server over its cluster's learners; each fit of the root runs ``training_rounds`` rounds.
    """

    CLASSIC = "classic"
    ROOT = "root"
    CLUSTER = "cluster"


def learners_needed(training: TrainingConfiguration) -> int:
    """Learners a classic aggregator, or one cluster aggregator, needs to keep training:
    ``max(min_fit_clients, min_evaluate_clients, min_available_clients)`` (Flower waits for
    ``min_available_clients`` before sampling; the validator keeps the other two below)."""
    return max(
        training.min_fit_clients, training.min_evaluate_clients, training.min_available_clients
    )


def root_clusters_needed(training: TrainingConfiguration, clusters: int) -> int:
    """Cluster aggregators the root needs to keep training: ``min(min_available_clients,
    clusters)`` where ``clusters`` is the number of clusters that took part at the start.

    So with ``min_available_clients`` 2, two clusters must stay; with 3 clusters and a
    minimum of 2, one cluster may be lost. (The SLA's minimums count learners per cluster;
    the root applies the same number to clusters, capped by how many there are.)
    """
    return max(1, min(training.min_available_clients, clusters))


class AggregatorSLA(BaseModel):
    """What the aggregator reads of the SLA the manager passes in ``FLOPS_SLA`` (the whole
    validated SLA as JSON); the SLA's other keys are ignored. Defaults are the SLA's."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    training_configuration: TrainingConfiguration = Field(default_factory=TrainingConfiguration)
    ml_model_flavor: MLModelFlavor = MLModelFlavor.PYTORCH
    customerID: str = "Admin"


def describe_validation_error(exc: ValidationError, prefix: str = "") -> str:
    """Every problem of ``exc`` as ``"<path>: <message>"`` joined by ``"; "``, each path
    prefixed with ``prefix`` (e.g. ``"training_configuration"``)."""
    problems = []
    for error in exc.errors(include_url=False):
        path = ".".join(str(part) for part in ([prefix] if prefix else []) + list(error["loc"]))
        problems.append(f"{path}: {error['msg']}" if path else str(error["msg"]))
    return "; ".join(problems)
