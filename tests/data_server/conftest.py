"""Fixtures of the data-plane tests: real Flight data servers on loopback and the real MNIST."""

from collections.abc import Iterator
from pathlib import Path

import datasets
import pytest

from data_server.mnist import load_mnist
from data_server.server import DataServer


@pytest.fixture(scope="session")
def mnist() -> datasets.Dataset:
    """The bundled MNIST test split (10,000 rows). Do not call ``set_format`` on it."""
    return load_mnist()


@pytest.fixture
def data_server(tmp_path: Path) -> Iterator[DataServer]:
    """A running data server on 127.0.0.1 (free port) serving ``tmp_path / "data"``."""
    with DataServer(tmp_path / "data") as server:
        yield server
