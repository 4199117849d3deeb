"""Abstract base classes that an ML repository's ``DataManager`` and ``ModelManager`` implement.

These keep the method names and meanings of the original FLOps templates so that existing
repositories run unchanged.
"""

from abc import ABC, abstractmethod
from typing import Any


class DataManagerTemplate(ABC):
    """Loads and prepares a learner's local data.

    Implementations call :func:`flops_utils.ml_repo_building_blocks.load_dataset` inside
    ``_prepare_data`` and preprocess what it returns.
    """

    @abstractmethod
    def _prepare_data(self) -> Any:
        """Fetch the node's local data with ``load_dataset()`` and preprocess it."""

    @abstractmethod
    def get_data(self) -> Any:
        """Return the prepared data, typically ``(train_data, test_data)``."""


class ModelManagerTemplate(ABC):
    """Wraps the user's model for training on a learner and aggregation on an aggregator.

    ``ModelManager()`` must not load data: the aggregator instantiates it without any.
    """

    @abstractmethod
    def set_model_data(self) -> None:
        """Load the local data (through the DataManager); called by the learner only."""

    @abstractmethod
    def get_model(self) -> Any:
        """Return the underlying model object (what MLflow logs with the repo's flavor)."""

    @abstractmethod
    def get_model_parameters(self) -> Any:
        """Return the model parameters as a list of NumPy arrays."""

    @abstractmethod
    def set_model_parameters(self, parameters: Any) -> None:
        """Replace the model parameters with ``parameters`` (a list of NumPy arrays)."""

    @abstractmethod
    def fit_model(self) -> int:
        """Train on the local training data; return the number of training samples."""

    @abstractmethod
    def evaluate_model(self) -> tuple[Any, Any, int]:
        """Evaluate on local held-out data; return ``(loss, accuracy, num_eval_samples)``."""
