"""Models: the McMahan 2017 MNIST models, logistic regression, LEAF's stacked LSTM, and user modules by import path."""

from fedloom.models.zoo import CNN, MLP2NN, LogisticRegression, StackedLSTM, build_model, register_model

__all__ = ["CNN", "MLP2NN", "LogisticRegression", "StackedLSTM", "build_model", "register_model"]
