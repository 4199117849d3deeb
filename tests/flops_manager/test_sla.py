"""The SLA models: original FLOps SLAs are accepted unchanged; bad values are rejected."""

import pytest
from pydantic import ValidationError

from flops_manager.sla import Platform, PostTrainingStep, ProjectSLA
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
