"""Helpers for tests that run a whole manager (``tests/e2e``)."""

import os
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

from flops_manager.client import ManagerClient
from flops_manager.config import ManagerConfig
from flops_manager.process_identity import ProcessIdentity
from flops_manager.suite import ManagerSuite

MockNodes = Callable[[ManagerSuite, int], AbstractContextManager[ManagerClient]]
"""``(suite, count)``: a context giving a client of ``suite`` once ``count`` nodes hold MNIST
(the ``mnist_nodes`` fixture of ``tests/e2e``)."""


def with_settings(config: ManagerConfig, **settings: object) -> ManagerConfig:
    """``config`` with ``settings`` changed, validated again (``ValidationError`` if wrong)."""
    return ManagerConfig.model_validate({**config.model_dump(exclude_unset=True), **settings})


def processes_mentioning(text: str) -> list[int]:
    """PIDs of the live processes (zombies aside) whose environment or command line mentions
    ``text``, this test process aside; services carry their project id in FLOPS_PROJECT_ID."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if ProcessIdentity.of(int(entry.name)) is None:
                continue
            blob = (entry / "environ").read_bytes() + (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if text.encode() in blob and state != "Z":
            found.append(int(entry.name))
    return found
