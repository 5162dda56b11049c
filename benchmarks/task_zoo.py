"""Tasks that ``bench_tasks.py`` runs through ``fedloom simulate`` (``task = "task_zoo:mnist"``).

The custom-loop task is ``examples/custom_loop/mnist_custom.py``'s ``make``.
"""

from __future__ import annotations

from pathlib import Path

import torch

import fedloom
from fedloom.data.mnist import load_mnist
from fedloom.models.zoo import CNN, MLP2NN

OPTIMIZERS = {
    "sgd": fedloom.LocalOptimizer(),
    "momentum": fedloom.LocalOptimizer(torch.optim.SGD, {"momentum": 0.9}),
    "adam": fedloom.LocalOptimizer(torch.optim.Adam),
}


def mnist(
    model: str = "2nn",
    optimizer: str = "sgd",
    data_dir: str = "",
    train_subset: int = 0,
    test_subset: int = 0,
) -> fedloom.Task:
    """MNIST with the 2NN or the CNN and a declarative optimiser (``sgd``, ``momentum`` or ``adam``).

    ``train_subset``/``test_subset`` keep the first examples (0 = all).
    """

    def data() -> fedloom.CentralData:
        m = load_mnist(Path(data_dir) if data_dir else None)
        train = m.train if train_subset <= 0 else m.train.subset(torch.arange(train_subset).numpy())
        test = m.test if test_subset <= 0 else m.test.subset(torch.arange(test_subset).numpy())
        return fedloom.CentralData(train=train, test=test, source=m.source)

    return fedloom.Task(
        model=MLP2NN if model == "2nn" else CNN,
        data=data,
        optimizer=OPTIMIZERS[optimizer],
        name=f"mnist-{model}-{optimizer}",
    )
