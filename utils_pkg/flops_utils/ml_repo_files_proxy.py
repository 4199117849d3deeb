"""Access to the ML repository's own files (``model_manager.py``) from FLOps code."""

import importlib
import os
import sys

from flops_utils import env_vars
from flops_utils.ml_repo_templates import ModelManagerTemplate


def add_repo_to_path(repo_dir: str | None = None) -> None:
    """Put the ML repository root on ``sys.path`` so its flat imports work.

    ``repo_dir`` defaults to ``$FLOPS_ML_REPO_DIR``, then the working directory.
    """
    path = repo_dir or os.environ.get(env_vars.ML_REPO_DIR) or os.getcwd()
    if path not in sys.path:
        sys.path.insert(0, path)


def get_model_manager(repo_dir: str | None = None) -> ModelManagerTemplate:
    """Import ``model_manager.ModelManager`` from the ML repository and return an instance.

    Raises ``ImportError`` when the repository has no ``model_manager.py`` or no
    ``ModelManager`` class in it, and ``TypeError`` when the class does not derive
    from :class:`ModelManagerTemplate`.
    """
    add_repo_to_path(repo_dir)
    module = importlib.import_module("model_manager")
    cls = getattr(module, "ModelManager", None)
    if cls is None:
        raise ImportError("model_manager.py defines no class ModelManager")
    if not (isinstance(cls, type) and issubclass(cls, ModelManagerTemplate)):
        raise TypeError("model_manager.ModelManager must subclass ModelManagerTemplate")
    instance: ModelManagerTemplate = cls()
    return instance
