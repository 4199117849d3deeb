"""Save a trained model as an MLflow model directory, inside the repository's own environment.

The user's ``ModelManager`` runs in a worker process in the repository's virtualenv, so the
final model is saved there, with whatever MLflow that environment has (``mlflow`` or
``mlflow-skinny``, from 2.12 to 3.x); the FLOps runtime uploads and registers the directory.
:func:`save_model` calls the flavor module's ``save_model`` (no tracking server involved).

Nothing but the standard library is imported at module level: MLflow and the ML framework
are imported when :func:`save_model` runs, so the module imports fast and anywhere.

MLflow behaviour relied on (checked against MLflow 2.12.1, 3.17.2 and 3.18.0 sources):

- ``mlflow.<flavor>.save_model(model, path, ...)`` writes an MLflow model directory
  (``MLmodel`` and the flavor's files) that ``mlflow.pyfunc.load_model(path)`` loads; the
  target must not exist or be empty (``_validate_and_prepare_target_save_path``).
- Passing ``pip_requirements`` skips the requirement inference, which otherwise loads the
  model in a subprocess (slow); the flavor's ``get_default_pip_requirements()`` gives the pins
  (``mlflow/<flavor>/__init__.py``).
- scikit-learn: ``serialization_format`` is ``"pickle"`` / ``"cloudpickle"`` (default) in 2.x
  and also ``"skops"`` (the default) in 3.x, whose loading needs the ``skops`` library and
  trusts only known types (``mlflow/sklearn/__init__.py``). An ``input_example`` lets MLflow
  infer the signature (it calls ``predict`` on it).
- PyTorch: in 3.x the default ``serialization_format`` is ``"pt2"`` (``torch.export``), which
  requires an ``input_example`` of NumPy arrays or tensors ("If `serialization_format` is set
  to 'pt2', then input_example is required"), and the pyfunc flavor is only added when that
  example is a single NumPy array. ``"pickle"`` (2.x's only format) saves the whole module
  with ``torch.save`` and the ``pickle_module`` (``mlflow.pytorch.pickle_module``, cloudpickle)
  (``mlflow/pytorch/__init__.py``). ``pt2`` also needs a tensor signature, which MLflow infers
  from the example; with ``mlflow-skinny`` 3.18 and no scipy that inference fails
  ("Failed to infer the model signature ... No module named 'scipy'") and so does ``pt2``,
  hence the fallback to ``pickle`` (logged).
- Keras: ``mlflow.keras`` is the Keras 3 flavor only when ``keras.__version__`` is 3 or
  newer; with Keras 2 (TensorFlow <= 2.15, e.g. TensorFlow 2.12's ``keras`` 2.12) it re-exports
  ``save_model``/``load_model`` of ``mlflow.tensorflow`` and nothing else, so its
  ``get_default_pip_requirements`` is that of ``mlflow.tensorflow`` (the module defining the
  ``save_model`` called) and the saved ``MLmodel`` has the ``tensorflow`` flavor.
  ``mlflow.tensorflow.save_model`` saves ``tf.keras`` models (classes of the ``keras``
  package, or of ``tf_keras``) and ``tf.Module`` objects (``mlflow/keras/__init__.py``,
  ``mlflow/tensorflow/__init__.py``).
- cloudpickle pickles classes of importable modules by reference; classes of modules
  registered with ``cloudpickle.register_pickle_by_value`` are pickled with their code, so
  the model loads where the repository's modules (``model_manager``, ``net``, ...) are not
  importable (cloudpickle README, "Overriding pickle's serialization mechanism").
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import os
import shutil
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from flops_utils.errors import FlopsError
from flops_utils.logging import logger

for _name, _value in {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    # The worker's directory may be a uv project unrelated to the model.
    "MLFLOW_UV_AUTO_DETECT": "false",
}.items():
    os.environ.setdefault(_name, _value)


class ModelSavingError(FlopsError):
    """The final model could not be saved with the SLA's ``ml_model_flavor``."""

    code = "model_saving_error"


@dataclass(frozen=True)
class FlavorSpec:
    """One flavor: its MLflow module, the framework it needs and how to recognize a model."""

    mlflow_module: str
    library: str
    pip_package: str
    description: str


FLAVORS: dict[str, FlavorSpec] = {
    "sklearn": FlavorSpec("mlflow.sklearn", "sklearn", "scikit-learn", "a scikit-learn estimator"),
    "pytorch": FlavorSpec("mlflow.pytorch", "torch", "torch", "a torch.nn.Module"),
    "tensorflow": FlavorSpec(
        "mlflow.tensorflow", "tensorflow", "tensorflow", "a TensorFlow module or Keras model"
    ),
    "keras": FlavorSpec("mlflow.keras", "keras", "keras", "a Keras model"),
}
"""Flavor name (the SLA's ``ml_model_flavor``) → how to save it."""

_LIBRARY_FLAVORS = {
    "sklearn": "sklearn",
    "torch": "pytorch",
    "keras": "keras",
    "tf_keras": "tensorflow",
    "tensorflow": "tensorflow",
}
"""Top-level module of a model's class → the flavor that model most likely needs."""

_KERAS_FLAVORS = frozenset({"keras", "tensorflow"})
"""Flavors that both save Keras models (``mlflow.tensorflow`` saves ``tf.keras`` models)."""

_PIP_NAMES = {
    # setuptools 81 removed pkg_resources, which MLflow 2.x imports without declaring it
    "pkg_resources": "setuptools<81",
    "sklearn": "scikit-learn",
    "yaml": "pyyaml",
    "PIL": "pillow",
    "cv2": "opencv-python",
    "google": "protobuf",
}
"""Module → ``pip install`` argument, where the distribution is named otherwise."""

SKLEARN_EXAMPLE_ROWS = 2
"""Rows of the all-zero input example made for scikit-learn models."""


def save_model(
    model: Any,
    flavor: str,
    path: str | os.PathLike[str],
    input_example: Any = None,
) -> dict[str, str]:
    """Save ``model`` with MLflow's ``flavor`` module to the new directory ``path``.

    Args:
        model: what ``ModelManager.get_model()`` returned: a scikit-learn estimator
            (``sklearn``), a ``torch.nn.Module`` (``pytorch``), a TensorFlow module or Keras
            model (``tensorflow``), a Keras model (``keras``; Keras 2 models are saved through
            ``mlflow.tensorflow``, see above).
        flavor: ``sklearn``, ``pytorch``, ``tensorflow`` or ``keras`` (the SLA's
            ``ml_model_flavor``).
        path: a directory that does not exist yet (or is empty); created.
        input_example: optional model input (e.g. a ``(n, features)`` array) from which MLflow
            infers the signature. For scikit-learn it defaults to a ``(2, n_features)``
            float64 all-zero ``pandas.DataFrame`` (``n_features`` from ``n_features_in_`` or
            ``coef_.shape[-1]``; omitted when neither exists or pandas is missing), giving a
            column signature that accepts arrays and DataFrames of any numeric dtype. For
            PyTorch a NumPy array or tensor example selects the ``pt2`` format where MLflow
            has it (falling back to ``pickle`` if export fails); without one the whole module
            is pickled.

    Returns ``{"flavor", "mlflow_version", "mlflow_distribution" ("mlflow" or
    "mlflow-skinny"), "library_version", "serialization_format", "path"}`` (strings; the
    format is ``"default"`` when MLflow chose it).

    Raises :class:`ModelSavingError` whose message names the cause: an unknown flavor, the
    flavor's library or MLflow missing from the repository's environment (with the
    ``pip install`` line), a model of the wrong type for the flavor (naming its type and the
    flavor it looks like), a non-empty ``path``, or MLflow failing to save (its error).
    """
    spec = FLAVORS.get(str(flavor))
    if spec is None:
        raise ModelSavingError(
            f"ml_model_flavor {flavor!r} is not one FLOps can save; use one of "
            f"{', '.join(repr(name) for name in FLAVORS)}."
        )
    target = Path(path)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ModelSavingError(
            f"Cannot save the model to {target}: it exists and is not an empty directory; "
            "pass a new directory."
        )
    if not _may_fit(_likely_flavor(model), flavor):  # e.g. a torch model, flavor 'sklearn'
        raise _wrong_type(model, flavor, spec)
    library = _import_library(spec, flavor)
    if not _is_flavor_model(model, flavor):
        raise _wrong_type(model, flavor, spec)
    module = _import_flavor_module(spec, flavor)
    mlflow_version, distribution = _mlflow_version()

    kwargs: dict[str, Any] = {}
    parameters = inspect.signature(module.save_model).parameters
    if flavor == "sklearn":
        fmt = _sklearn_format(module, model, parameters)
        if input_example is None:
            input_example = sklearn_input_example(model)
    elif flavor == "pytorch":
        input_example = _numpy_example(input_example)
        fmt = _pytorch_format(parameters, input_example)
    else:
        fmt = None
    if fmt is not None:
        kwargs["serialization_format"] = fmt
    requirements = _default_pip_requirements(_saving_module(module), fmt)
    if requirements is not None and "pip_requirements" in parameters:
        kwargs["pip_requirements"] = requirements
    if input_example is not None:
        kwargs["input_example"] = input_example

    try:
        _save(module, model, target, kwargs)
    except Exception as exc:
        if fmt == "pt2":  # torch.export cannot trace every model; the pickle format can save it
            logger.warning(
                "saving the model in MLflow's pt2 format failed (%s: %s); saving it with pickle",
                type(exc).__name__,
                " ".join(str(exc).split())[:300],
            )
            _clear(target)
            kwargs["serialization_format"] = fmt = "pickle"
            try:
                _save(module, model, target, kwargs)
            except Exception as retry_exc:
                raise _saving_failed(spec, flavor, mlflow_version, retry_exc) from retry_exc
        else:
            raise _saving_failed(spec, flavor, mlflow_version, exc) from exc
    return {
        "flavor": flavor,
        "mlflow_version": mlflow_version,
        "mlflow_distribution": distribution,
        "library_version": str(getattr(library, "__version__", "unknown")),
        "serialization_format": fmt or "default",
        "path": str(target),
    }


def sklearn_input_example(model: Any) -> Any:
    """A ``(2, n_features)`` all-zero float64 ``pandas.DataFrame`` for a scikit-learn model.

    ``n_features`` comes from ``n_features_in_`` or, for linear models whose coefficients were
    set by hand (as FedAvg does on the aggregator), ``coef_.shape[-1]``. ``None`` when neither
    exists or pandas/NumPy are not installed. A DataFrame example gives MLflow a column-based
    (``double``) signature, which accepts NumPy arrays and DataFrames of any numeric dtype; a
    float64 NumPy example would give a tensor signature rejecting float32 input.
    """
    try:
        import numpy as np
        import pandas as pd
    except ImportError:
        return None
    n_features = getattr(model, "n_features_in_", None)
    if n_features is None and getattr(model, "coef_", None) is not None:
        n_features = np.asarray(model.coef_).shape[-1]
    if n_features is None:
        return None
    return pd.DataFrame(np.zeros((SKLEARN_EXAMPLE_ROWS, int(n_features)), dtype=np.float64))


def _import_library(spec: FlavorSpec, flavor: str) -> ModuleType:
    """Import the flavor's framework or raise naming the ``pip install`` line."""
    if importlib.util.find_spec(spec.library) is None:
        raise ModelSavingError(
            f"ml_model_flavor {flavor!r} needs the {spec.pip_package} library, which is not "
            "installed in the repository's environment; add it to the repository's "
            f"dependencies (pip install {spec.pip_package}) or fix ml_model_flavor in the SLA."
        )
    try:
        return importlib.import_module(spec.library)
    except ImportError as exc:
        raise ModelSavingError(
            f"Importing {spec.library} failed in the repository's environment ({exc}); "
            f"fix the installation of {spec.pip_package} in the repository's dependencies."
        ) from exc


def _import_flavor_module(spec: FlavorSpec, flavor: str) -> Any:
    """Import ``mlflow.<flavor>`` or raise naming what the environment lacks."""
    if importlib.util.find_spec("mlflow") is None:
        raise ModelSavingError(
            "The repository's environment lacks MLflow, which saves the final model; add "
            "mlflow to the repository's dependencies (pip install mlflow-skinny)."
        )
    try:
        import mlflow
    except ImportError as exc:
        raise _import_failed("mlflow", exc) from exc
    try:
        return importlib.import_module(spec.mlflow_module)
    except ModuleNotFoundError as exc:
        if exc.name == spec.mlflow_module:
            raise ModelSavingError(
                f"MLflow {mlflow.__version__} in the repository's environment has no "
                f"{spec.mlflow_module} module for ml_model_flavor {flavor!r}; pin a newer "
                "mlflow in the repository's dependencies."
            ) from exc
        raise _import_failed(spec.mlflow_module, exc) from exc
    except ImportError as exc:
        raise _import_failed(spec.mlflow_module, exc) from exc


def _import_failed(module: str, exc: ImportError) -> ModelSavingError:
    """The error for ``import module`` failing with ``exc`` in the repository's environment."""
    missing = exc.name if isinstance(exc, ModuleNotFoundError) else None
    if missing:
        top = missing.split(".")[0]
        package = _PIP_NAMES.get(top, top)
        return ModelSavingError(
            f"Importing {module} failed because the module {missing!r} is missing from the "
            f"repository's environment; add it to the repository's dependencies "
            f"(pip install '{package}')."
        )
    return ModelSavingError(
        f"Importing {module} failed in the repository's environment ({exc}); its mlflow "
        "and framework versions may not fit together."
    )


def _likely_flavor(model: Any) -> str | None:
    """The flavor the library defining ``type(model)`` suggests, if it is a known one."""
    return _LIBRARY_FLAVORS.get(type(model).__module__.split(".")[0])


def _may_fit(likely: str | None, flavor: str) -> bool:
    """False if a model of the ``likely`` flavor cannot be saved with ``flavor``; Keras models
    (``keras`` or ``tf_keras`` classes) may fit both ``keras`` and ``tensorflow``, which
    :func:`_is_flavor_model` then decides."""
    return likely is None or likely == flavor or {likely, flavor} <= _KERAS_FLAVORS


def _wrong_type(model: Any, flavor: str, spec: FlavorSpec) -> ModelSavingError:
    """The error for a ``model`` that is not of the kind ``flavor`` saves, naming its type."""
    cls = type(model)
    name = f"{cls.__module__}.{cls.__qualname__}"
    likely = _likely_flavor(model)
    if likely is not None and likely != flavor:
        hint = f"it looks like a {likely} model: set ml_model_flavor to {likely!r} in the SLA."
    else:
        hint = (
            "return the model object itself (not e.g. its parameters or a wrapper) or fix "
            "ml_model_flavor in the SLA."
        )
    return ModelSavingError(
        f"ModelManager.get_model() returned a {name}, which is not {spec.description} as "
        f"ml_model_flavor {flavor!r} needs; {hint}"
    )


def _is_flavor_model(model: Any, flavor: str) -> bool:
    if flavor == "sklearn":
        from sklearn.base import BaseEstimator

        return isinstance(model, BaseEstimator) or (
            callable(getattr(model, "fit", None)) and callable(getattr(model, "predict", None))
        )
    if flavor == "pytorch":
        import torch

        return isinstance(model, torch.nn.Module)
    if flavor == "keras":
        import keras

        return isinstance(model, keras.Model)
    import tensorflow as tf

    types: list[type] = [tf.Module]
    with contextlib.suppress(ImportError, AttributeError):
        import keras

        types.append(keras.Model)
    return isinstance(model, tuple(types))


def _mlflow_version() -> tuple[str, str]:
    """``(version, distribution)`` of the MLflow installed (``mlflow`` or ``mlflow-skinny``)."""
    import mlflow

    for distribution in ("mlflow", "mlflow-skinny"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            importlib.metadata.version(distribution)
            return str(mlflow.__version__), distribution
    return str(mlflow.__version__), "unknown"


def _sklearn_format(module: Any, model: Any, parameters: Any) -> str | None:
    """``"skops"`` when MLflow offers it, skops is installed and trusts every type of
    ``model``; else ``"cloudpickle"`` when offered; else ``None`` (MLflow's default)."""
    if "serialization_format" not in parameters:
        return None
    formats = list(getattr(module, "SUPPORTED_SERIALIZATION_FORMATS", []))
    if "skops" in formats and importlib.util.find_spec("skops") is not None:
        try:
            import skops.io

            if not skops.io.get_untrusted_types(data=skops.io.dumps(model)):
                return "skops"
        except Exception:  # skops cannot serialize this model: use cloudpickle
            pass
    return "cloudpickle" if "cloudpickle" in formats else None


def _pytorch_format(parameters: Any, input_example: Any) -> str | None:
    """``"pt2"`` for a NumPy example where MLflow has it, ``"pickle"`` otherwise (``None``
    when MLflow has no ``serialization_format`` and pickles anyway)."""
    if "serialization_format" not in parameters:
        return None
    import numpy as np

    return "pt2" if isinstance(input_example, np.ndarray) else "pickle"


def _numpy_example(input_example: Any) -> Any:
    """A tensor example as a NumPy array: MLflow adds no pyfunc flavor for tensor examples."""
    if input_example is not None and hasattr(input_example, "detach"):
        return input_example.detach().cpu().numpy()
    return input_example


def _saving_module(module: Any) -> Any:
    """``module`` itself, or the module defining its ``save_model`` if that one has
    ``get_default_pip_requirements`` and ``module`` has not (``mlflow.keras`` with Keras 2
    re-exports ``mlflow.tensorflow.save_model`` only)."""
    if hasattr(module, "get_default_pip_requirements"):
        return module
    defining = sys.modules.get(getattr(module.save_model, "__module__", None) or "")
    if defining is not None and hasattr(defining, "get_default_pip_requirements"):
        return defining
    return module


def _default_pip_requirements(module: Any, fmt: str | None) -> list[str] | None:
    """The flavor's ``get_default_pip_requirements(...)`` for ``fmt``, or ``None``."""
    function = getattr(module, "get_default_pip_requirements", None)
    if function is None:
        return None
    accepted = inspect.signature(function).parameters
    kwargs = {
        key: value
        for key, value in (
            ("include_cloudpickle", fmt == "cloudpickle"),
            ("include_skops", fmt == "skops"),
        )
        if key in accepted
    }
    try:
        return list(function(**kwargs))
    except Exception:  # let MLflow infer them instead
        return None


def _save(module: Any, model: Any, target: Path, kwargs: dict[str, Any]) -> None:
    with _user_modules_by_value():
        module.save_model(model, str(target), **kwargs)


@contextlib.contextmanager
def _user_modules_by_value() -> Iterator[None]:
    """Have cloudpickle embed the code of the repository's own modules while saving.

    Repository modules are those loaded from files outside the interpreter's and the
    environment's library directories (and outside ``flops_utils``), e.g. ``model_manager``
    and ``net``. Unregistered again on exit.
    """
    try:
        import cloudpickle
    except ImportError:
        yield
        return
    registered = []
    for module in _user_modules():
        try:
            cloudpickle.register_pickle_by_value(module)
        except (ValueError, TypeError):  # not importable by name: pickled by value anyway
            continue
        registered.append(module)
    try:
        yield
    finally:
        for module in registered:
            with contextlib.suppress(ValueError):
                cloudpickle.unregister_pickle_by_value(module)


def _user_modules() -> list[ModuleType]:
    """Top-level modules of ``sys.modules`` loaded from the user's files (see above)."""
    library_dirs = {
        Path(directory).resolve()
        for key in ("stdlib", "platstdlib", "purelib", "platlib")
        if (directory := sysconfig.get_paths().get(key))
    }
    library_dirs.add(Path(__file__).resolve().parent)  # flops_utils
    modules = []
    for name, module in list(sys.modules.items()):
        if "." in name or name == "__main__" or not isinstance(module, ModuleType):
            continue
        file = getattr(module, "__file__", None)
        if not file:
            continue
        resolved = Path(file).resolve()
        if any(resolved.is_relative_to(directory) for directory in library_dirs):
            continue
        if "site-packages" in resolved.parts or "dist-packages" in resolved.parts:
            continue
        modules.append(module)
    return modules


def _clear(target: Path) -> None:
    if target.is_dir():
        shutil.rmtree(target)


def _saving_failed(spec: FlavorSpec, flavor: str, version: str, exc: Exception) -> ModelSavingError:
    detail = " ".join(str(exc).split())[:300]
    return ModelSavingError(
        f"{spec.mlflow_module} (MLflow {version}) failed to save the model of "
        f"ml_model_flavor {flavor!r}: {type(exc).__name__}: {detail}"
    )
