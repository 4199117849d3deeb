"""Multinomial logistic regression on MNIST (after the Flower scikit-learn example)."""

import warnings

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss

from flops_utils.ml_repo_templates import ModelManagerTemplate

N_CLASSES = 10
N_FEATURES = 784  # 28 x 28 pixels
LOCAL_EPOCHS = 5


class ModelManager(ModelManagerTemplate):
    def __init__(self):
        self.model = LogisticRegression(penalty="l2", max_iter=LOCAL_EPOCHS, warm_start=True)
        self._set_initial_params()
        self.x_train = self.y_train = self.x_test = self.y_test = None

    def _set_initial_params(self):
        # The server asks for parameters before anyone trained, so sklearn needs these set.
        self.model.classes_ = np.array([i for i in range(N_CLASSES)])
        self.model.coef_ = np.zeros((N_CLASSES, N_FEATURES))
        if self.model.fit_intercept:
            self.model.intercept_ = np.zeros((N_CLASSES,))

    def set_model_data(self):
        from data_manager import DataManager

        (self.x_train, self.y_train), (self.x_test, self.y_test) = DataManager().get_data()

    def get_model(self):
        return self.model

    def get_model_parameters(self):
        if self.model.fit_intercept:
            return [self.model.coef_, self.model.intercept_]
        return [self.model.coef_]

    def set_model_parameters(self, parameters):
        self.model.coef_ = parameters[0]
        if self.model.fit_intercept:
            self.model.intercept_ = parameters[1]

    def fit_model(self):
        # Ignore convergence failure due to low local epochs
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.model.fit(self.x_train, self.y_train)
        return len(self.x_train)

    def evaluate_model(self):
        loss = log_loss(self.y_test, self.model.predict_proba(self.x_test), labels=range(10))
        accuracy = self.model.score(self.x_test, self.y_test)
        return loss, accuracy, len(self.x_test)
