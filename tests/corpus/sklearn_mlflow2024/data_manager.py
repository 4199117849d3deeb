"""Loads the MNIST digits of this client and splits them into train and test sets."""

from flops_utils.ml_repo_building_blocks import load_dataset
from flops_utils.ml_repo_templates import DataManagerTemplate

TEST_SIZE = 0.2
SEED = 42


class DataManager(DataManagerTemplate):
    def __init__(self):
        (self.x_train, self.y_train), (self.x_test, self.y_test) = self._prepare_data()

    def _prepare_data(self):
        dataset = load_dataset()
        dataset.set_format("numpy")
        split = dataset.train_test_split(test_size=TEST_SIZE, seed=SEED)

        # Flatten the 28x28 images and scale the pixels to [0, 1].
        x_train = split["train"]["image"].reshape(-1, 784) / 255.0
        y_train = split["train"]["label"]
        x_test = split["test"]["image"].reshape(-1, 784) / 255.0
        y_test = split["test"]["label"]
        return (x_train, y_train), (x_test, y_test)

    def get_data(self):
        return (self.x_train, self.y_train), (self.x_test, self.y_test)
