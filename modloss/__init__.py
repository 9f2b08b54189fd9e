"""modloss: the modular loss of "Joint Training of Neural Network Ensembles" and the
batched ensembles, data pipelines, training protocol and analyses around it.

A plain PyTorch library: nothing here imports Ray or MLflow.
"""

from modloss.losses import (
    FAMILIES,
    REDUCTIONS,
    LossParts,
    ModularLoss,
    combine,
    member_nll,
    modular_loss,
    predict,
)
from modloss.models import create_model, list_models, register_model

__all__: list[str] = [
    "FAMILIES",
    "REDUCTIONS",
    "LossParts",
    "ModularLoss",
    "combine",
    "create_model",
    "list_models",
    "member_nll",
    "modular_loss",
    "predict",
    "register_model",
]
