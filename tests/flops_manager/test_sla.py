"""The SLA models: original FLOps SLAs are accepted unchanged; bad values are rejected."""

import pytest
from pydantic import ValidationError

from flops_manager.sla import (
    STRATEGY_ADAPTER,
    STRATEGY_NAMES,
    FedAdagradConfig,
    FedAdamConfig,
    FedAvgConfig,
    FedMedianConfig,
    FedProxConfig,
    FedTrimmedAvgConfig,
    FedYogiConfig,
    Platform,
    PostTrainingStep,
    ProjectSLA,
)
from flops_utils.types import FLOpsMode, MLModelFlavor

# The two example SLAs of the original FLOps documentation ("Project SLAs" page).
ORIGINAL_CLASSIC = {
    "verbose": True,
    "customerID": "Admin",
    "ml_repo_url": "https://github.com/Malyuk-A/flops_ml_repo_mnist_sklearn",
    "ml_model_flavor": "sklearn",
    "training_configuration": {
        "data_tags": ["mnist"],
        "min_available_clients": 2,
        "min_fit_clients": 2,
        "min_evaluate_clients": 2,
    },
    "post_training_steps": ["build_image_for_trained_model", "deploy_trained_model_image"],
}
ORIGINAL_HIERARCHICAL = {
    "customerID": "Admin",
    "ml_repo_url": "https://github.com/Malyuk-A/flops_ml_repo_cifar10_pytorch",
    "ml_model_flavor": "pytorch",
    "supported_platforms": ["linux/amd64", "linux/arm64"],
    "training_configuration": {
        "mode": "hierarchical",
        "data_tags": ["cifar10"],
        "training_cycles": 10,
        "training_rounds": 5,
        "min_available_clients": 3,
        "min_fit_clients": 3,
        "min_evaluate_clients": 3,
    },
    "post_training_steps": ["build_image_for_trained_model", "deploy_trained_model_image"],
}


def test_original_classic_sla_is_accepted_with_the_original_defaults() -> None:
    sla = ProjectSLA.model_validate(ORIGINAL_CLASSIC)

    assert sla.ml_model_flavor is MLModelFlavor.SKLEARN
    assert sla.supported_platforms == [Platform.LINUX_AMD64]
    assert sla.use_devel_base_images is False
    assert sla.training_configuration.mode is FLOpsMode.CLASSIC
    assert sla.training_configuration.training_rounds == 3
    assert sla.training_configuration.training_cycles == 1
    assert sla.post_training_steps == [
        PostTrainingStep.BUILD_IMAGE_FOR_TRAINED_MODEL,
        PostTrainingStep.DEPLOY_TRAINED_MODEL_IMAGE,
    ]


def test_original_hierarchical_multi_platform_sla_is_accepted() -> None:
    sla = ProjectSLA.model_validate(ORIGINAL_HIERARCHICAL)

    assert sla.training_configuration.mode is FLOpsMode.HIERARCHICAL
    assert sla.training_configuration.training_cycles == 10
    assert sla.supported_platforms == [Platform.LINUX_AMD64, Platform.LINUX_ARM64]


def test_resource_constraints_are_megabytes_and_counts() -> None:
    sla = ProjectSLA.model_validate(
        {**ORIGINAL_CLASSIC, "resource_constraints": {"memory": 250, "vcpus": 1, "storage": 25}}
    )

    assert (sla.resource_constraints.memory, sla.resource_constraints.storage) == (250, 25)


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"training_configuration": {"training_rounds": 0}}, "training_rounds"),
        ({"training_configuration": {"data_tags": []}}, "data_tags"),
        ({"ml_model_flavor": "caffe"}, "ml_model_flavor"),
        ({"supported_platforms": ["linux/s390x"]}, "supported_platforms"),
        ({"resource_constraints": {"memory": 0}}, "memory"),
        ({"ml_repo_url": ""}, "ml_repo_url"),
        ({"training_configuration": {"min_available_clients": 1, "min_fit_clients": 2}}, ""),
        ({"trainig_rounds": 3}, "trainig_rounds"),
    ],
)
def test_bad_values_are_rejected_naming_the_field(patch: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        ProjectSLA.model_validate({**ORIGINAL_CLASSIC, **patch})

    text = str(caught.value)
    assert field in text
    if not field:
        assert "min_fit_clients (2) exceeds min_available_clients (1)" in text


# The ``strategy`` extension: Flower's strategies with their parameters.


def _with_strategy(strategy: object) -> dict[str, object]:
    original = ORIGINAL_CLASSIC["training_configuration"]
    assert isinstance(original, dict)
    training = {**original, "strategy": strategy}
    return {**ORIGINAL_CLASSIC, "training_configuration": training}


def test_an_sla_without_strategy_uses_fedavg() -> None:
    sla = ProjectSLA.model_validate(ORIGINAL_CLASSIC)

    assert sla.training_configuration.strategy == FedAvgConfig(name="FedAvg")
    assert sla.model_dump(mode="json")["training_configuration"]["strategy"] == {"name": "FedAvg"}


@pytest.mark.parametrize(
    ("strategy", "model", "parameters"),
    [
        ({"name": "FedAvg"}, FedAvgConfig, {}),
        ({"name": "FedProx", "proximal_mu": 0.1}, FedProxConfig, {"proximal_mu": 0.1}),
        (
            {"name": "FedAdam", "eta": 0.05, "beta_2": 0.999},
            FedAdamConfig,
            {"eta": 0.05, "eta_l": 0.1, "beta_1": 0.9, "beta_2": 0.999, "tau": 1e-9},
        ),
        (
            {"name": "FedYogi"},
            FedYogiConfig,
            {"eta": 0.01, "eta_l": 0.0316, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3},
        ),
        (
            {"name": "FedAdagrad", "tau": 0.001},
            FedAdagradConfig,
            {"eta": 0.1, "eta_l": 0.1, "tau": 0.001},
        ),
        ({"name": "FedMedian"}, FedMedianConfig, {}),
        ({"name": "FedTrimmedAvg"}, FedTrimmedAvgConfig, {"beta": 0.2}),
        ({"name": "FedTrimmedAvg", "beta": 0.1}, FedTrimmedAvgConfig, {"beta": 0.1}),
    ],
)
def test_each_strategy_is_parsed_with_flowers_defaults(
    strategy: dict[str, object], model: type, parameters: dict[str, float]
) -> None:
    sla = ProjectSLA.model_validate(_with_strategy(strategy))

    parsed = sla.training_configuration.strategy
    assert type(parsed) is model
    assert parsed.name == strategy["name"]
    assert parsed.flower_kwargs() == parameters
    assert ProjectSLA.model_validate(sla.model_dump(mode="json")) == sla  # stored and reloaded


def test_the_defaults_are_the_installed_flowers() -> None:
    # Every default above is the default of the Flower class of the same name.
    import inspect

    from flwr.server import strategy as flower

    for name in STRATEGY_NAMES:
        model = STRATEGY_ADAPTER.validate_python(
            {"name": name, **({"proximal_mu": 0.0} if name == "FedProx" else {})}
        )
        signature = inspect.signature(getattr(flower, name))
        for parameter, value in model.flower_kwargs().items():
            default = signature.parameters[parameter].default
            if default is not inspect.Parameter.empty:
                assert value == default, f"{name}.{parameter}"


def test_an_unknown_strategy_lists_the_valid_names() -> None:
    with pytest.raises(ValidationError) as caught:
        ProjectSLA.model_validate(_with_strategy({"name": "FedSGD"}))

    [error] = caught.value.errors()
    assert error["loc"] == ("training_configuration", "strategy")
    assert "'FedSGD'" in error["msg"]
    for name in STRATEGY_NAMES:
        assert f"'{name}'" in error["msg"]


def test_a_strategy_without_name_lists_the_valid_names() -> None:
    with pytest.raises(ValidationError) as caught:
        ProjectSLA.model_validate(_with_strategy({"proximal_mu": 0.1}))

    [error] = caught.value.errors()
    assert error["loc"] == ("training_configuration", "strategy")
    assert "needs a 'name', one of FedAvg, FedProx, FedAdam" in error["msg"]


@pytest.mark.parametrize(
    ("strategy", "field", "message"),
    [
        ({"name": "FedProx"}, "proximal_mu", "Field required"),
        ({"name": "FedProx", "proximal_mu": -0.1}, "proximal_mu", "greater than or equal to 0"),
        ({"name": "FedAdam", "eta": 0}, "eta", "greater than 0"),
        ({"name": "FedAdam", "beta_1": 1.0}, "beta_1", "less than 1"),
        ({"name": "FedYogi", "beta_2": -0.5}, "beta_2", "greater than or equal to 0"),
        ({"name": "FedYogi", "tau": 2}, "tau", "less than or equal to 1"),
        ({"name": "FedAdagrad", "eta_l": 100}, "eta_l", "less than or equal to 10"),
        ({"name": "FedAdagrad", "beta_1": 0.9}, "beta_1", "Extra inputs are not permitted"),
        ({"name": "FedTrimmedAvg", "beta": 0.5}, "beta", "less than 0.5"),
        ({"name": "FedMedian", "beta": 0.1}, "beta", "Extra inputs are not permitted"),
        ({"name": "FedAdam", "eta": "fast"}, "eta", "valid number"),
        ({"name": "FedAdam", "eta": float("inf")}, "eta", "finite number"),
    ],
)
def test_bad_strategy_parameters_are_rejected_naming_the_field(
    strategy: dict[str, object], field: str, message: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        ProjectSLA.model_validate(_with_strategy(strategy))

    [error] = caught.value.errors()
    assert error["loc"] == ("training_configuration", "strategy", strategy["name"], field)
    assert message in error["msg"]


def test_the_training_models_are_the_contracts_and_the_aggregator_reads_a_full_sla() -> None:
    # Prepare
    from flops_manager import sla
    from flops_utils.contract import training

    # Execute
    project = ProjectSLA.model_validate(ORIGINAL_CLASSIC)
    seen = training.AggregatorSLA.model_validate_json(project.model_dump_json())

    # Assert: one definition (re-exported), and the manager's SLA reads back unchanged
    for name in training.__all__:
        if hasattr(sla, name):
            assert getattr(sla, name) is getattr(training, name), name
    assert sla.TrainingConfiguration is training.TrainingConfiguration
    assert seen.training_configuration == project.training_configuration
    assert (seen.ml_model_flavor, seen.customerID) == (MLModelFlavor.SKLEARN, "Admin")


def test_the_sla_module_imports_no_other_manager_module() -> None:
    # the aggregator's image carries flops_manager/sla.py alone (image_builder.oci_builder)
    import ast
    from pathlib import Path

    import flops_manager.sla as sla_module

    tree = ast.parse(Path(sla_module.__file__).read_text())
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]

    assert not [name for name in imported if name.startswith("flops_manager")]
