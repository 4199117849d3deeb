"""Column access on ``datasets.Dataset`` as in datasets 2.x/3.x, whatever datasets is installed.

Why: ML repositories written for the original FLOps (datasets 2.x/3.x) index whole columns and
use the result as an array or a list, e.g.::

    ds = load_dataset(); ds.set_format("numpy")
    split = ds.train_test_split(test_size=0.2, seed=42)
    x = split["train"]["image"].reshape(-1, 784) / 255.0

The datasets 4.0.0 release made ``Dataset.__getitem__(str)`` return a lazy
``datasets.arrow_dataset.Column`` instead of the materialized column (huggingface/datasets
PR #7614 "Lazy column"; the breakage is discussed in issue #7709). A ``Column`` has no
``.reshape``, ``.shape`` or arithmetic, so such code fails with ``AttributeError: 'Column'
object has no attribute 'reshape'``. FLOps runs user code in the user's own environment, where
datasets may be anything from 2.14 to 4.x.

Mechanism: on datasets >= 4, :func:`with_materialized_columns` re-classes a ``Dataset`` (or the
splits of a ``DatasetDict``) to :class:`MaterializedColumnsDataset`, a ``datasets.Dataset``
subclass whose ``__getitem__`` answers a column name the way datasets 3.x did (it calls
``Dataset._getitem``, the formatting path datasets 4 itself still uses for the ``arrow``,
``pandas`` and ``polars`` formats): a ``numpy.ndarray`` under the ``numpy`` format, a ``list``
without a format, decoded values (``PIL.Image.Image`` for HF ``Image`` features), the output of
the transform under ``with_transform``. Rows, slices and index lists behave as before.

Datasets derived from it keep the subclass: datasets builds them either by ``copy.deepcopy``
(``with_format``, ``with_transform``, ``rename_column``, ...; the class is kept by Python) or
by calling ``Dataset(...)`` directly (``select``, ``train_test_split``, ``map``, ``filter``,
``flatten_indices``, ...). For the latter, every public method of ``datasets.Dataset`` is
wrapped so that a plain ``Dataset`` it returns, or the splits of a ``DatasetDict``, are
re-classed before the caller sees them. ``DatasetDict`` methods delegate to these methods, so
their results are covered too. Module-level functions of datasets that build a new
``Dataset`` (``concatenate_datasets``, ``interleave_datasets``) return plain datasets: pass
their result to :func:`with_materialized_columns` again.

On datasets < 4 nothing is changed: the objects are returned as they are.

Importing this module is cheap: ``datasets`` is imported on first use. Only the standard
library and ``datasets`` are used, so it works with numpy 1.24+ and 2.x and pyarrow 14+.
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import datasets

LAZY_COLUMN_MAJOR_VERSION = 4
"""First major version of ``datasets`` whose ``Dataset.__getitem__(str)`` returns a ``Column``."""

SUBCLASS_NAME = "MaterializedColumnsDataset"
"""Name under which the subclass is reachable as an attribute of this module (for pickle)."""

DatasetOrDict = TypeVar("DatasetOrDict", "datasets.Dataset", "datasets.DatasetDict")

_lock = threading.Lock()
_subclass: type[Any] | None = None


def datasets_major_version(version: str | None = None) -> int:
    """Return the major version of ``version`` (default: the installed ``datasets``).

    ``"4.8.5"`` → ``4``, ``"4.0.0.dev0"`` → ``4``. Raises ``ValueError`` when the version
    does not start with a number (imports ``datasets`` when ``version`` is ``None``).
    """
    if version is None:
        import datasets

        version = str(datasets.__version__)
    head = version.strip().split(".", 1)[0]
    if not head.isdigit():
        raise ValueError(f"Cannot read the major version of datasets {version!r}.")
    return int(head)


def returns_lazy_columns(version: str | None = None) -> bool:
    """Whether ``Dataset.__getitem__(column_name)`` of datasets ``version`` returns a ``Column``.

    ``version`` defaults to the installed ``datasets``. True from datasets 4.0.0 on.
    """
    return datasets_major_version(version) >= LAZY_COLUMN_MAJOR_VERSION


def materialized_columns_class() -> type[datasets.Dataset]:
    """Return :class:`MaterializedColumnsDataset`, the ``datasets.Dataset`` subclass (built once).

    It is also reachable as ``flops_utils.dataset_compat.MaterializedColumnsDataset``, which is
    how pickle (and dill, used by ``map(num_proc=N)``) finds it in another process.
    """
    global _subclass
    with _lock:
        if _subclass is None:
            _subclass = _build_subclass()
        return _subclass


def with_materialized_columns(dataset: DatasetOrDict) -> DatasetOrDict:
    """Make column access on ``dataset`` return the materialized column, as datasets 3.x did.

    Args:
        dataset: a ``datasets.Dataset`` or a ``datasets.DatasetDict`` (each split is handled).

    Returns the same object. On datasets >= 4 a ``Dataset`` (each split of a ``DatasetDict``)
    is re-classed in place to :class:`MaterializedColumnsDataset`, so that ``dataset["col"]``
    returns e.g. a ``numpy.ndarray`` of shape ``(rows, 28, 28)`` for an ``Array2D((28, 28))``
    column under ``set_format("numpy")``, and a ``list`` of ``rows`` values without a format;
    datasets derived from it (``with_format``, ``select``, ``shuffle``, ``train_test_split``,
    ``map``, ``filter``, ``with_transform``, ``flatten_indices``, ...) keep this behaviour.
    Data, features, format and fingerprint are untouched; nothing is copied. On datasets < 4
    the object is returned unchanged.

    Raises ``TypeError`` for anything but a ``Dataset`` or ``DatasetDict`` (an
    ``IterableDataset`` is not supported).
    """
    import datasets

    if not isinstance(dataset, datasets.Dataset | datasets.DatasetDict):
        raise TypeError(
            "with_materialized_columns expects a datasets.Dataset or datasets.DatasetDict, "
            f"not {type(dataset).__name__}."
        )
    if returns_lazy_columns():
        _adopt(dataset, materialized_columns_class())
    return dataset


def _adopt(result: Any, subclass: type[Any]) -> Any:
    """Re-class ``result`` (a plain Dataset, or the plain Dataset splits of a DatasetDict)."""
    import datasets

    if type(result) is datasets.Dataset:
        result.__class__ = subclass
    elif isinstance(result, datasets.DatasetDict):
        for split in result.values():
            if type(split) is datasets.Dataset:
                split.__class__ = subclass
    return result


def _keeping_subclass(method: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a ``Dataset`` method so that a plain Dataset it returns gets the caller's class."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        return _adopt(method(self, *args, **kwargs), type(self))

    return wrapper


def _build_subclass() -> type[Any]:
    """Create the subclass: ``__getitem__`` of datasets 3.x plus result-adopting methods."""
    import datasets

    base = datasets.Dataset
    base_getitem = base.__getitem__

    def __getitem__(self: Any, key: Any) -> Any:
        """``dataset[key]``; a column name gives the whole formatted column (datasets 3.x)."""
        if isinstance(key, str):
            return self._getitem(key)
        return base_getitem(self, key)

    namespace: dict[str, Any] = {
        "__module__": __name__,
        "__qualname__": SUBCLASS_NAME,
        "__doc__": (
            "A datasets.Dataset whose column access returns the materialized column (as in "
            "datasets 2.x/3.x); see flops_utils.dataset_compat."
        ),
        "__getitem__": __getitem__,
    }
    for name in dir(base):
        if name.startswith("_"):
            continue
        attribute = inspect.getattr_static(base, name)
        if inspect.isfunction(attribute):  # not properties, classmethods or staticmethods
            namespace[name] = _keeping_subclass(attribute)
    return type(SUBCLASS_NAME, (base,), namespace)


def __getattr__(name: str) -> Any:
    """Build :class:`MaterializedColumnsDataset` on first access (keeps the import cheap)."""
    if name == SUBCLASS_NAME:
        return materialized_columns_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
