"""A complete experiment on your own task with nothing but ``import fedloom``.

python examples/notebook.py
"""

import torch
from torch import nn

import fedloom
from fedloom.metrics import accuracy, auc

# Two Gaussian blobs per client, the clients' blobs shifted differently (non-IID).
gen = torch.Generator().manual_seed(0)
clients = []
for _ in range(8):
    shift = torch.randn(2, generator=gen)
    x = torch.randn(60, 2, generator=gen) + shift
    y = ((x - shift).sum(dim=1) + 0.3 * torch.randn(60, generator=gen) > 0).float()
    clients.append(fedloom.ArrayDataset(x, y))
x_test = torch.randn(400, 2, generator=gen)
test = fedloom.ArrayDataset(x_test, (x_test.sum(dim=1) > 0).float())

task = fedloom.Task(
    model=lambda: nn.Linear(2, 1),  # one logit: binary classification
    data=fedloom.ClientData(train=clients, test=test),
    loss=lambda out, y: nn.functional.binary_cross_entropy_with_logits(out.reshape(-1), y),
    optimizer=fedloom.LocalOptimizer(torch.optim.SGD, {"momentum": 0.9}),
    metrics={"accuracy": accuracy, "auc": auc},
)
history = fedloom.simulate(
    task, {"rounds": 15, "client.lr": 0.05, "sampling.fraction": 0.5, "algorithm.name": "fedprox"}
)
print(f"final test accuracy {history.final['test_accuracy']:.3f}, AUC {history.final['test_auc']:.3f}")
