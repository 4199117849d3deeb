"""Building blocks ML repositories call; today: ``load_dataset``."""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import datasets


def load_dataset() -> "datasets.Dataset":
    """Return every local dataset whose tag is among the SLA's data tags, as one Dataset.

    Reads ``$FLOPS_DATA_SERVER`` (Arrow Flight location) and ``$FLOPS_DATA_TAGS``.
    Implemented in :mod:`flops_utils.data_client`.
    """
    from flops_utils.data_client import load_dataset_from_env

    return load_dataset_from_env()
