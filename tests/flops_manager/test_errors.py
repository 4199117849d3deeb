"""Every FLOps error has a stable code, a meaning and an HTTP status (STYLE.md "Errors")."""

import importlib
import pkgutil

import pytest

import aggregator
import data_server
import flops_manager
import image_builder
import learner
import observatory
from flops_manager.errors import HTTP_STATUS, http_status
from flops_utils.errors import FlopsError

PACKAGES = (flops_manager, image_builder, learner, aggregator, data_server, observatory)


def all_error_classes() -> list[type[FlopsError]]:
    for package in PACKAGES:
        for module in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            if not module.name.endswith(".__main__"):  # those run their process's main()
                importlib.import_module(module.name)
    for name in ("data_client", "user_code", "errors", "model_worker_client", "model_saving"):
        importlib.import_module(f"flops_utils.{name}")
    found: list[type[FlopsError]] = []
    pending = [FlopsError]
    while pending:
        cls = pending.pop()
        found.append(cls)
        pending.extend(cls.__subclasses__())
    return found


ERRORS = all_error_classes()


def test_the_error_tree_is_loaded() -> None:
    assert len(ERRORS) >= 30


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: f"{e.__module__}.{e.__name__}")
def test_each_error_has_a_code_a_meaning_and_a_status(error: type[FlopsError]) -> None:
    instance = error.__new__(error)
    FlopsError.__init__(instance, "message")

    assert error.code and error.code.replace("_", "").isalnum() and error.code.islower()
    assert error.__doc__ and len(error.__doc__.strip()) > 10
    assert 400 <= http_status(instance) < 600


def test_codes_name_one_error_each() -> None:
    owners: dict[str, list[str]] = {}
    for error in ERRORS:
        if "code" in error.__dict__:
            owners.setdefault(error.code, []).append(f"{error.__module__}.{error.__name__}")

    assert {code: names for code, names in owners.items() if len(names) > 1} == {}


def test_the_status_table_maps_to_client_or_server_errors() -> None:
    assert all(400 <= status < 600 for status in HTTP_STATUS.values())
