"""Loads this node's MNIST data through FLOps and prepares it for scikit-learn."""

import numpy as np

from flops_utils.ml_repo_building_blocks import load_dataset
from flops_utils.ml_repo_templates import DataManagerTemplate

TEST_FRACTION = 0.2
SEED = 42


class DataManager(DataManagerTemplate):
    """Splits the local data into train and test parts; pixels become floats in [0, 1]."""

    def __init__(self) -> None:
        self.train, self.test = self._prepare_data()

    def _prepare_data(self):
        dataset = load_dataset()
        dataset.set_format("numpy")
        split = dataset.train_test_split(test_size=TEST_FRACTION, seed=SEED)
        return _to_xy(split["train"]), _to_xy(split["test"])

    def get_data(self):
        return self.train, self.test


def _to_xy(part):
    images = np.asarray(part["image"][:], dtype=np.float32)
    x = images.reshape(len(images), -1) / 255.0
    y = np.asarray(part["label"][:], dtype=np.int64)
    return x, y
