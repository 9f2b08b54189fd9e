"""Batched ensemble models and the registry of the paper's configurations.

Every model returns member natural parameters ``(M, N, K)`` and accepts
``forward(x, members=None)`` to evaluate a subset of its members.
"""

from modloss.models._base import EnsembleModel, MemberSelection, member_generator
from modloss.models._registry import create_model, list_models, num_members, register_model
from modloss.models.cnn import EnsembleCNN
from modloss.models.densenet import EnsembleDenseNet
from modloss.models.mlp import EnsembleMLP

__all__ = [
    "EnsembleCNN",
    "EnsembleDenseNet",
    "EnsembleMLP",
    "EnsembleModel",
    "MemberSelection",
    "create_model",
    "list_models",
    "member_generator",
    "num_members",
    "register_model",
]
