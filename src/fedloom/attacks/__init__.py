"""Simulated Byzantine attacks: model poisoning (client stages, ALIE adversary) and label flipping."""

from fedloom.attacks.data_poisoning import LabelFlippedDataset, flip_labels
from fedloom.attacks.model_poisoning import (
    ALIE,
    GaussianAttack,
    Scaling,
    SignFlip,
    alie_z,
    malicious_clients,
)

__all__ = [
    "ALIE",
    "GaussianAttack",
    "LabelFlippedDataset",
    "Scaling",
    "SignFlip",
    "alie_z",
    "flip_labels",
    "malicious_clients",
]
