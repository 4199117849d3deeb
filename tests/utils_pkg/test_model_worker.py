"""The model worker boundary: real worker processes running a small repository's code."""

import io
import os
import textwrap
from pathlib import Path

import numpy as np
import pytest

from flops_utils.model_worker_client import (
    ModelWorker,
    ModelWorkerDataError,
    ModelWorkerDied,
    ModelWorkerStartError,
    RemoteUserCodeError,
)
from flops_utils.model_worker_protocol import (
    ConnectionClosed,
    ProtocolError,
    read_message,
    write_message,
)
from flops_utils.user_code import UserCodeError

MODEL_MANAGER = """
import os, sys
import numpy as np
from flops_utils.ml_repo_templates import ModelManagerTemplate


class ModelManager(ModelManagerTemplate):
    def __init__(self):
        if os.environ.get("BREAK_INIT"):
            raise RuntimeError("no GPU found")
        self.weights = [np.zeros((3, 2), dtype=np.float32), np.arange(2, dtype=np.int64)]
        self.data = None

    def set_model_data(self):
        if os.environ.get("LOAD_REAL_DATA"):
            from data_manager import DataManager
            self.data = DataManager().get_data()
        else:
            self.data = 5

    def get_model(self):
        return self.weights

    def get_model_parameters(self):
        return self.weights

    def set_model_parameters(self, parameters):
        self.weights = [np.array(p) for p in parameters]

    def fit_model(self):
        behaviour = os.environ.get("FIT", "")
        print("training noise on stdout", flush=True)
        if behaviour == "raise":
            raise ValueError("shapes (3,) and (4,) not aligned")
        if behaviour == "exit":
            sys.exit(3)
        if behaviour == "kill":
            os.kill(os.getpid(), 9)
        self.weights = [w + 1 for w in self.weights]
        return 10 * self.data

    def evaluate_model(self):
        return np.float32(0.5), 0.75, 7
"""

DATA_MANAGER = """
from flops_utils.ml_repo_building_blocks import load_dataset
from flops_utils.ml_repo_templates import DataManagerTemplate


class DataManager(DataManagerTemplate):
    def __init__(self):
        self.data = self._prepare_data()

    def _prepare_data(self):
        return load_dataset()

    def get_data(self):
        return self.data
"""


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A small repository in the user contract (no data needed unless LOAD_REAL_DATA)."""
    path = tmp_path / "repo"
    path.mkdir()
    (path / "model_manager.py").write_text(textwrap.dedent(MODEL_MANAGER))
    (path / "data_manager.py").write_text(textwrap.dedent(DATA_MANAGER))
    return path


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FIT", "BREAK_", "LOAD_"))}
    return {**env, **extra}


def test_arrays_and_numbers_cross_the_boundary_both_ways(repo: Path) -> None:
    # Execute
    with ModelWorker(repo, env=_env()) as worker:
        initial = worker.get_model_parameters()
        worker.set_model_parameters([np.full((3, 2), 2.5, dtype=np.float32), np.array([7, 8])])
        worker.set_model_data()
        examples = worker.fit_model()
        trained = worker.get_model_parameters()
        evaluated = worker.evaluate_model()
        pid = worker.pid

    # Assert: dtypes and shapes kept, the user's numbers as Python numbers
    assert [(a.dtype, a.shape) for a in initial] == [(np.float32, (3, 2)), (np.int64, (2,))]
    assert np.array_equal(trained[0], np.full((3, 2), 3.5)) and trained[1].tolist() == [8, 9]
    assert examples == 50
    assert evaluated == (0.5, 0.75, 7)
    assert pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the worker is gone after close


def test_a_user_exception_keeps_its_type_and_message_and_the_worker_serves_on(
    repo: Path,
) -> None:
    # Execute
    with ModelWorker(repo, env=_env(FIT="raise")) as worker:
        worker.set_model_data()
        with pytest.raises(RemoteUserCodeError) as caught:
            worker.fit_model()
        after = worker.evaluate_model()

    # Assert
    assert type(caught.value).__name__ == "ValueError"
    assert str(caught.value) == "shapes (3,) and (4,) not aligned"
    assert after == (0.5, 0.75, 7)


@pytest.mark.parametrize(
    ("behaviour", "expected"),
    [("exit", "exited with code 3"), ("kill", "was killed by SIGKILL (the kernel's OOM")],
)
def test_a_worker_that_ends_during_a_call_is_reported(
    repo: Path, behaviour: str, expected: str
) -> None:
    # Execute
    with ModelWorker(repo, env=_env(FIT=behaviour)) as worker:
        worker.set_model_data()
        with pytest.raises(ModelWorkerDied) as caught:
            worker.fit_model()
        with pytest.raises(ModelWorkerDied, match="not running"):
            worker.evaluate_model()

    # Assert: a user-code error naming the call and how the process ended
    assert isinstance(caught.value, UserCodeError)
    assert "during ModelManager.fit_model" in caught.value.message
    assert expected in caught.value.message


def test_a_failing_constructor_is_a_user_code_error(repo: Path) -> None:
    # Execute / Assert
    with pytest.raises(UserCodeError, match=r"ModelManager\(\) raised RuntimeError: no GPU found"):
        ModelWorker(repo, env=_env(BREAK_INIT="1")).start()


def test_a_repository_without_model_manager_is_a_user_code_error(tmp_path: Path) -> None:
    with pytest.raises(UserCodeError, match=r"ModuleNotFoundError.*model_manager"):
        ModelWorker(tmp_path, env=_env()).start()


def test_load_dataset_errors_are_data_errors(repo: Path) -> None:
    # Prepare: no data server configured
    env = _env(LOAD_REAL_DATA="1")
    env.pop("FLOPS_DATA_SERVER", None)

    # Execute / Assert
    with ModelWorker(repo, env=env) as worker, pytest.raises(ModelWorkerDataError) as caught:
        worker.set_model_data()
    assert "FLOPS_DATA_SERVER" in caught.value.message


def test_a_missing_interpreter_is_a_start_error(repo: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelWorkerStartError, match="no interpreter where") as caught:
        ModelWorker(repo, python=tmp_path / "venv" / "bin" / "python").start()
    assert str(tmp_path) not in caught.value.message  # no host path in a project's status


def test_an_interpreter_without_flops_utils_is_a_start_error(repo: Path, tmp_path: Path) -> None:
    # Prepare: the base interpreter (no numpy or flops_utils importable from /)
    import sys

    base = getattr(sys, "_base_executable", sys.executable)
    env = _env()
    env.pop("PYTHONPATH", None)

    # Execute / Assert
    with pytest.raises(ModelWorkerStartError, match="not importable"):
        ModelWorker(tmp_path, python=base, env=env).start()


def test_framing_rejects_pickles_and_truncation() -> None:
    # Prepare
    stream = io.BytesIO()
    write_message(stream, {"op": "x"}, [np.arange(3, dtype=np.uint8), np.zeros((0, 4))])
    whole = stream.getvalue()

    # Execute
    header, arrays = read_message(io.BytesIO(whole))

    # Assert
    assert header == {"op": "x"}
    assert arrays[0].tolist() == [0, 1, 2] and arrays[1].shape == (0, 4)
    with pytest.raises(ValueError):
        write_message(io.BytesIO(), {}, [np.array([object()], dtype=object)])
    with pytest.raises(ProtocolError, match="truncated"):
        read_message(io.BytesIO(whole[:-5]))
    with pytest.raises(ConnectionClosed):
        read_message(io.BytesIO(b""))
    with pytest.raises(ProtocolError, match="not JSON"):
        read_message(io.BytesIO(b"\x00\x00\x00\x03abc"))
