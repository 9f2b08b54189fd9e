"""Ensembles of one-hidden-layer ReLU MLPs (the paper's Fashion-MNIST models, Section 4.1)."""

import torch
import torch.nn.functional as F
from torch import Tensor

from modloss.layers import EnsembleLinear, SharedInputLinear, check_positive
from modloss.models._base import EnsembleModel, MemberSelection
from modloss.models._registry import build_model, register_model

__all__ = ["EnsembleMLP"]


class EnsembleMLP(EnsembleModel):
    """M MLPs ``in_features -> hidden -> num_classes`` with ReLU, evaluated together.

    The hidden layer of all members is one ``(in_features -> M * hidden)`` matmul on the
    shared input; the output layer is one batched matmul over ``(M, hidden, num_classes)``.
    Initialisation is ``nn.Linear``'s default per member, as in the paper's code.

    Args:
        num_members: M.
        hidden: hidden units of one member.
        in_features: input size (inputs are flattened: 784 for 28x28 images).
        num_classes: K.
        seed: initialisation seed (see :meth:`EnsembleModel.reset_parameters`).

    Shape:
        input ``(N, in_features)`` or ``(N, *)`` with ``in_features`` elements per example;
        output ``(M', N, K)``.
    """

    def __init__(
        self,
        num_members: int,
        hidden: int,
        in_features: int = 784,
        num_classes: int = 10,
        *,
        seed: int | None = None,
    ) -> None:
        super().__init__(num_members, num_classes)
        check_positive("hidden", hidden)
        check_positive("in_features", in_features)
        self.config = dict(
            num_members=num_members,
            hidden=hidden,
            in_features=in_features,
            num_classes=num_classes,
        )
        # Placeholder draws, replaced by reset_parameters(seed): the global RNG stays untouched.
        scratch = torch.Generator()
        self.hidden = SharedInputLinear(num_members, in_features, hidden, generator=scratch)
        self.head = EnsembleLinear(num_members, hidden, num_classes, generator=scratch)
        self.reset_parameters(seed)

    def forward(self, x: Tensor, members: MemberSelection = None) -> Tensor:
        index = self._member_index(members)
        # One copy to a dense (M', N, hidden) block before the ReLU: the batched matmul and
        # the ReLU's backward then read and write matching layouts (faster than both
        # working on the strided view that the shared layer returns).
        h = F.relu(self.hidden(x.flatten(1), index).contiguous())  # (M', N, hidden)
        return self.head(h, index)  # (M', N, K)


def _paper_mlp(num_members: int, hidden: int, seed: int | None, overrides: dict) -> EnsembleMLP:
    defaults = dict(num_members=num_members, hidden=hidden, in_features=784, num_classes=10)
    return build_model(EnsembleMLP, defaults, seed, overrides)


@register_model("1-M-1024-H")
def mlp_1_m_1024_h(*, seed: int | None = None, **overrides) -> EnsembleMLP:
    """One 784-1024-10 MLP: 814,090 parameters."""
    return _paper_mlp(1, 1024, seed, overrides)


@register_model("16-M-64-H")
def mlp_16_m_64_h(*, seed: int | None = None, **overrides) -> EnsembleMLP:
    """16 MLPs 784-64-10: 814,240 parameters."""
    return _paper_mlp(16, 64, seed, overrides)


@register_model("64-M-16-H")
def mlp_64_m_16_h(*, seed: int | None = None, **overrides) -> EnsembleMLP:
    """64 MLPs 784-16-10: 814,720 parameters."""
    return _paper_mlp(64, 16, seed, overrides)


@register_model("256-M-4-H")
def mlp_256_m_4_h(*, seed: int | None = None, **overrides) -> EnsembleMLP:
    """256 MLPs 784-4-10: 816,640 parameters."""
    return _paper_mlp(256, 4, seed, overrides)
