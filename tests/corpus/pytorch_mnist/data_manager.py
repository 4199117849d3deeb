"""MNIST from FLOps as PyTorch data loaders."""

from torch.utils.data import DataLoader, TensorDataset

from flops_utils.ml_repo_building_blocks import load_dataset
from flops_utils.ml_repo_templates import DataManagerTemplate

BATCH_SIZE = 32


class DataManager(DataManagerTemplate):
    def __init__(self):
        self.trainloader, self.testloader = self._prepare_data()

    def _prepare_data(self):
        dataset = load_dataset().with_format("torch")
        split = dataset.train_test_split(test_size=0.2, seed=42)

        def to_tensors(part):
            images = part["image"].float().div(255.0).unsqueeze(1)  # N x 1 x 28 x 28
            images = (images - 0.1307) / 0.3081
            return TensorDataset(images, part["label"])

        trainloader = DataLoader(to_tensors(split["train"]), batch_size=BATCH_SIZE, shuffle=True)
        testloader = DataLoader(to_tensors(split["test"]), batch_size=BATCH_SIZE)
        return trainloader, testloader

    def get_data(self):
        return self.trainloader, self.testloader
