"""Helpers for tests that run a whole manager (``tests/e2e``)."""

from collections.abc import Callable
from contextlib import AbstractContextManager

from flops_manager.client import ManagerClient
from flops_manager.config import ManagerConfig
from flops_manager.suite import ManagerSuite

MockNodes = Callable[[ManagerSuite, int], AbstractContextManager[ManagerClient]]
"""``(suite, count)``: a context giving a client of ``suite`` once ``count`` nodes hold MNIST
(the ``mnist_nodes`` fixture of ``tests/e2e``)."""


def with_settings(config: ManagerConfig, **settings: object) -> ManagerConfig:
    """``config`` with ``settings`` changed, validated again (``ValidationError`` if wrong)."""
    return ManagerConfig.model_validate({**config.model_dump(exclude_unset=True), **settings})
