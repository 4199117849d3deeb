"""Trains the CNN of net.py with plain PyTorch (after the Flower PyTorch quickstart)."""

from collections import OrderedDict

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from flops_utils.ml_repo_templates import ModelManagerTemplate
from net import Net

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
LOCAL_EPOCHS = 1
LEARNING_RATE = 0.01


class ModelManager(ModelManagerTemplate):
    def __init__(self):
        self.model = Net().to(DEVICE)
        self.trainloader = None
        self.testloader = None
        self.history = pd.DataFrame(columns=["loss", "accuracy"])

    def set_model_data(self):
        from data_manager import DataManager

        self.trainloader, self.testloader = DataManager().get_data()

    def get_model(self):
        return self.model

    def get_model_parameters(self):
        return [val.cpu().numpy() for _, val in self.model.state_dict().items()]

    def set_model_parameters(self, parameters):
        params_dict = zip(self.model.state_dict().keys(), parameters)
        state_dict = OrderedDict({k: torch.tensor(np.array(v)) for k, v in params_dict})
        self.model.load_state_dict(state_dict, strict=True)

    def fit_model(self):
        criterion = torch.nn.CrossEntropyLoss()
        optimizer = torch.optim.SGD(self.model.parameters(), lr=LEARNING_RATE, momentum=0.9)
        self.model.train()
        for _ in range(LOCAL_EPOCHS):
            for images, labels in tqdm(self.trainloader, desc="train", leave=False):
                images, labels = images.to(DEVICE), labels.to(DEVICE)
                optimizer.zero_grad()
                loss = criterion(self.model(images), labels)
                loss.backward()
                optimizer.step()
        return len(self.trainloader.dataset)

    def evaluate_model(self):
        criterion = torch.nn.CrossEntropyLoss(reduction="sum")
        correct, loss = 0, 0.0
        self.model.eval()
        with torch.no_grad():
            for images, labels in tqdm(self.testloader, desc="test", leave=False):
                images, labels = images.to(DEVICE), labels.to(DEVICE)
                outputs = self.model(images)
                loss += criterion(outputs, labels).item()
                correct += (outputs.argmax(dim=1) == labels).sum().item()
        total = len(self.testloader.dataset)
        loss, accuracy = loss / total, correct / total
        self.history.loc[len(self.history)] = [loss, accuracy]
        return loss, accuracy, total
