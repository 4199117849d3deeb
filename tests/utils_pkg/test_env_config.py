"""Reading FLOPS_* variables: each problem is the process's own error, naming the variable."""

from pathlib import Path

import pytest

from flops_utils import env_vars
from flops_utils.env_config import EnvReader
from flops_utils.errors import FlopsError


class RoleConfigError(FlopsError):
    """A role's configuration problem (test)."""

    code = "role_config_error"


def reader(tmp_path: Path, **env: str) -> EnvReader:
    return EnvReader(
        {env_vars.ML_REPO_DIR: str(tmp_path), **env}, RoleConfigError, "the tests set it"
    )


def test_values_are_read_and_checked(tmp_path: Path) -> None:
    (tmp_path / "model_manager.py").write_text("")
    read = reader(
        tmp_path,
        FLOPS_MQTT_URL="mqtt://10.0.0.1:1884",
        FLOPS_AGGREGATOR_ADDRESS=" 0.0.0.0:8080 ",
        FLOPS_CONNECT_TIMEOUT_S="2.5",
    )

    assert read.mqtt_url() == "mqtt://10.0.0.1:1884"
    assert read.host_port(env_vars.AGGREGATOR_ADDRESS, "x") == "0.0.0.0:8080"
    assert read.seconds(env_vars.CONNECT_TIMEOUT_S, 60) == 2.5
    assert read.seconds("FLOPS_UNSET", 60) == 60.0
    assert read.repo_dir() == tmp_path


@pytest.mark.parametrize(
    ("env", "call", "message"),
    [
        ({}, lambda r: r.required("FLOPS_PROJECT_ID"), "FLOPS_PROJECT_ID is not set; the tests"),
        ({"FLOPS_MQTT_URL": "http://x:1"}, lambda r: r.mqtt_url(), "FLOPS_MQTT_URL: MQTT URL"),
        (
            {"FLOPS_AGGREGATOR_ADDRESS": "8080"},
            lambda r: r.host_port("FLOPS_AGGREGATOR_ADDRESS", "the bind address, e.g. :1"),
            "FLOPS_AGGREGATOR_ADDRESS='8080' is not HOST:PORT; set it to the bind address",
        ),
        (
            {"FLOPS_CONNECT_TIMEOUT_S": "soon"},
            lambda r: r.seconds("FLOPS_CONNECT_TIMEOUT_S", 1),
            "FLOPS_CONNECT_TIMEOUT_S='soon' is not a number of seconds",
        ),
        ({}, lambda r: r.repo_dir(), "has no model_manager.py; point FLOPS_ML_REPO_DIR"),
    ],
)
def test_problems_raise_the_roles_error_naming_the_variable(
    tmp_path: Path, env: dict[str, str], call: object, message: str
) -> None:
    with pytest.raises(RoleConfigError) as caught:
        call(reader(tmp_path, **env))  # type: ignore[operator]
    assert message in caught.value.message
