"""A multinomial logistic regression on the 784 MNIST pixels, trained federatedly."""

import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss

from flops_utils.ml_repo_templates import ModelManagerTemplate

NUM_CLASSES = 10
NUM_FEATURES = 28 * 28
LOCAL_EPOCHS = 10


class ModelManager(ModelManagerTemplate):
    """Holds the model; data is loaded only on learners (``set_model_data``)."""

    def __init__(self) -> None:
        self.model = LogisticRegression(max_iter=LOCAL_EPOCHS, warm_start=True)
        # Start from zeros so the aggregator can send parameters before any training.
        self.model.classes_ = np.arange(NUM_CLASSES)
        self.model.coef_ = np.zeros((NUM_CLASSES, NUM_FEATURES), dtype=np.float32)
        self.model.intercept_ = np.zeros(NUM_CLASSES, dtype=np.float32)
        self.train = self.test = None

    def set_model_data(self) -> None:
        from data_manager import DataManager

        self.train, self.test = DataManager().get_data()

    def get_model(self):
        return self.model

    def get_model_parameters(self):
        return [self.model.coef_, self.model.intercept_]

    def set_model_parameters(self, parameters) -> None:
        self.model.coef_ = np.asarray(parameters[0])
        self.model.intercept_ = np.asarray(parameters[1])

    def fit_model(self) -> int:
        x, y = self.train
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            self.model.fit(x, y)
        return len(x)

    def evaluate_model(self):
        x, y = self.test
        loss = log_loss(y, self.model.predict_proba(x), labels=list(range(NUM_CLASSES)))
        accuracy = self.model.score(x, y)
        return float(loss), float(accuracy), len(x)
