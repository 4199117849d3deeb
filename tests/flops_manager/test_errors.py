"""Every FLOps error has a stable code, a meaning and an HTTP status; the errors a request can
cause map to 4xx/502/503, every other one is an internal 500."""

import importlib
import pkgutil

import pytest

import aggregator
import data_server
import flops_manager
import image_builder
import learner
import observatory
from data_server.mock_provider import InvalidPartitioning
from flops_manager.auth import Forbidden, Unauthorized
from flops_manager.broker import BrokerUnavailable
from flops_manager.errors import (
    HTTP_STATUS,
    INTERNAL_ERROR_STATUS,
    ConfigurationError,
    Conflict,
    NotFound,
    OakestraConflict,
    OakestraError,
    OakestraUnavailable,
    http_status,
)
from flops_manager.lifecycle.admission import UnsupportedSla
from flops_manager.store import StoreUnavailable
from flops_utils.data_client import DataPlaneError, DataServerUnavailable, InvalidDataTag
from flops_utils.errors import FlopsError
from image_builder.errors import RepoFetchError

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
        if not cls.__module__.split(".")[-1].startswith(("test_", "conftest")):
            found.append(cls)  # errors tests define for themselves are not FLOps' own
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


REQUEST_ERRORS: list[tuple[type[FlopsError], int]] = [
    (Unauthorized, 401),
    (Forbidden, 403),
    (NotFound, 404),
    (Conflict, 409),
    (UnsupportedSla, 422),
    (InvalidPartitioning, 422),
    (InvalidDataTag, 422),
    (OakestraConflict, 409),
    (OakestraError, 502),
    (DataPlaneError, 502),
    (StoreUnavailable, 503),
    (BrokerUnavailable, 503),
    (DataServerUnavailable, 503),
    (OakestraUnavailable, 503),
]
"""Errors a request can raise (admission, mocks, cancel, the store) and their status."""


@pytest.mark.parametrize(
    ("error", "status"), REQUEST_ERRORS, ids=lambda e: getattr(e, "__name__", e)
)
def test_errors_a_request_can_cause_are_never_a_500(error: type[FlopsError], status: int) -> None:
    instance = error.__new__(error)
    FlopsError.__init__(instance, "message")

    assert http_status(instance) == status


@pytest.mark.parametrize("error", [FlopsError, ConfigurationError, RepoFetchError])
def test_an_unmapped_error_is_internal_not_a_400(error: type[FlopsError]) -> None:
    assert http_status(error("message")) == INTERNAL_ERROR_STATUS == 500


def test_a_subclass_of_an_unmapped_error_is_internal_too() -> None:
    class Unmapped(ConfigurationError):
        """A subclass nobody mapped."""

    assert http_status(Unmapped("message")) == 500
