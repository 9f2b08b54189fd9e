"""Dutt et al.'s coupled-ensemble losses 'LL', 'SM' and 'FC', computed as their code does.

For M members with logits ``eta_j`` and target class ``y`` (the paper's appendix):

- 'LL': the mean of the member cross-entropies, ``(1/M) sum_j CE(eta_j, y)``;
- 'SM': the mean of the member log-softmaxes, ``(1/M) sum_j log softmax(eta_j)``, given to
  ``NLLLoss`` although it is not normalised; its value at ``y`` is again
  ``-(1/M) sum_j CE(eta_j, y)``, so 'SM' is 'LL' (Eq. 17-22);
- 'FC': the cross-entropy of the mean logits, ``CE((1/M) sum_j eta_j, y)``: the modular loss
  at ``lam = 1``.

'LL' and 'SM' therefore train each member independently with its learning rate divided by M
(each member's gradient is that of its own loss, times 1/M), and only 'FC' couples the members.
"""

import torch.nn.functional as F
from torch import Tensor

from modloss.losses import REDUCTIONS, check_choice, check_eta, check_target, reduce_loss

__all__ = ["COUPLED_METHODS", "coupled_loss"]

COUPLED_METHODS = ("LL", "SM", "FC")


def coupled_loss(eta: Tensor, target: Tensor, method: str, *, reduction: str = "mean") -> Tensor:
    """Dutt et al.'s coupled-training loss ``method`` of an ensemble of classifiers.

    Args:
        eta: member logits ``(M, N, K)``.
        target: ``(N,)`` int64 class indices.
        method: ``"LL"``, ``"SM"`` or ``"FC"`` (see the module docstring).
        reduction: ``"mean"`` or ``"sum"`` over examples, or ``"none"``.

    Returns:
        A scalar, or ``(N,)`` with ``reduction="none"``.
    """
    method = check_choice("method", method, COUPLED_METHODS)
    reduction = check_choice("reduction", reduction, REDUCTIONS)
    eta = check_eta(eta)
    target = check_target(eta, target, "categorical")
    m, n, k = eta.shape
    if method == "FC":
        return F.cross_entropy(eta.mean(0), target, reduction=reduction)
    if method == "SM":
        return F.nll_loss(F.log_softmax(eta, dim=-1).mean(0), target, reduction=reduction)
    per_member = F.cross_entropy(eta.reshape(m * n, k), target.repeat(m), reduction="none")
    return reduce_loss(per_member.view(m, n).mean(0), reduction)
