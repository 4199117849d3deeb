"""A small dense network for MNIST in tf.keras (after the Flower TensorFlow quickstart)."""

import tensorflow as tf

from flops_utils.ml_repo_templates import ModelManagerTemplate

EPOCHS = 1
BATCH_SIZE = 32


def create_model():
    model = tf.keras.models.Sequential(
        [
            tf.keras.layers.Dense(128, activation="relu", input_shape=(784,)),
            tf.keras.layers.Dropout(0.2),
            tf.keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(
        optimizer="adam",
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


class ModelManager(ModelManagerTemplate):
    def __init__(self):
        self.model = create_model()

    def set_model_data(self):
        from data_manager import DataManager

        (self.x_train, self.y_train), (self.x_test, self.y_test) = DataManager().get_data()

    def get_model(self):
        return self.model

    def get_model_parameters(self):
        return self.model.get_weights()

    def set_model_parameters(self, parameters):
        self.model.set_weights(parameters)

    def fit_model(self):
        self.model.fit(self.x_train, self.y_train, epochs=EPOCHS, batch_size=BATCH_SIZE)
        return len(self.x_train)

    def evaluate_model(self):
        loss, accuracy = self.model.evaluate(self.x_test, self.y_test)
        return loss, accuracy, len(self.x_test)
