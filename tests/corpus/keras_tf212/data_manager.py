"""Loads the MNIST digits of this client as NumPy arrays for Keras."""

from flops_utils.ml_repo_building_blocks import load_dataset
from flops_utils.ml_repo_templates import DataManagerTemplate


class DataManager(DataManagerTemplate):
    def __init__(self):
        (self.x_train, self.y_train), (self.x_test, self.y_test) = self._prepare_data()

    def _prepare_data(self):
        dataset = load_dataset()
        dataset.set_format("numpy")
        split = dataset.train_test_split(test_size=0.2, seed=42)

        # 28x28 images -> 784 pixels in [0, 1]
        x_train = split["train"]["image"].reshape(-1, 784).astype("float32") / 255.0
        y_train = split["train"]["label"]
        x_test = split["test"]["image"].reshape(-1, 784).astype("float32") / 255.0
        y_test = split["test"]["label"]
        return (x_train, y_train), (x_test, y_test)

    def get_data(self):
        return (self.x_train, self.y_train), (self.x_test, self.y_test)
