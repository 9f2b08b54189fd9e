"""Batched per-epoch metrics of an ensemble: losses, errors, entropy and module dominance.

Everything is computed from member natural parameters ``eta`` of shape ``(M, N, K)`` with
tensor operations over all members at once. :class:`EpochMetrics` keeps running sums as
tensors on the device of ``eta``; :meth:`EpochMetrics.compute` moves them to the host in a
single transfer, so an epoch costs one host synchronisation per split, not one per batch.

``error`` depends on the family: for ``"categorical"`` it is the misclassification rate of
the ensemble (argmax of the mean logits); for ``"gaussian"`` and ``"poisson"`` it is the
root-mean-square error of the ensemble mean ``predict(eta)`` (averaged over examples and
the K outputs). Per-member errors use each member's own prediction the same way.

Module dominance (the paper's section 4.2): ``dominance_gap`` is the best member's error
minus the ensemble's error. Independent members make an ensemble clearly better than its
best member (large gap); when one module carries the ensemble the gap shrinks towards zero
while ``members_near_chance`` counts the modules left near chance level.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from modloss.losses import combine, member_nll, predict

__all__ = ["NEAR_CHANCE_FRACTION", "EpochMetrics", "evaluate", "member_entropy"]

# A member counts as "near chance" once its error is within 10% of chance level: close
# enough to flag modules that stayed near initialisation, loose enough to ignore noise.
NEAR_CHANCE_FRACTION = 0.9


def member_entropy(eta: Tensor) -> Tensor:
    """Predictive entropy (nats) of each member's categorical prediction: (M, N, K) -> (M, N)."""
    # Classes first: a softmax over a short last dimension runs 3x slower on CPU.
    logp = torch.log_softmax(eta.transpose(-1, -2).contiguous(), dim=-2)
    return -(logp.exp() * logp).sum(-2)


class EpochMetrics:
    """Running sums of the per-epoch metrics for one split, kept on the device.

    Args:
        family: ``"categorical"``, ``"gaussian"`` or ``"poisson"``.
        lam: the modular-loss weight; ``loss = lam * ensemble_nll + (1 - lam) * member_nll``.

    Call :meth:`update` with detached ``eta`` for every batch, then :meth:`compute` once.
    """

    def __init__(self, family: str, lam: float) -> None:
        self.family = family
        self.lam = lam
        self.count = 0
        self.num_classes = 0
        self._sums: dict[str, Tensor] = {}

    @torch.no_grad()
    def update(self, eta: Tensor, target: Tensor) -> None:
        """Add one batch: ``eta`` (M, N, K), ``target`` (N,) classes or (N, K) values."""
        eta = eta.detach()
        ensemble_nll = member_nll(combine(eta).unsqueeze(0), target, self.family)[0]  # (N,)
        if self.family == "categorical":
            # One log_softmax serves member NLL, member error and entropy: over a last
            # dimension of 10 it is the most expensive op here.
            logp = torch.log_softmax(eta, dim=-1)  # (M, N, K)
            idx = target.view(1, -1, 1).expand(eta.shape[0], -1, 1)
            nll = -logp.gather(-1, idx).squeeze(-1)  # (M, N)
            sums = {
                "ensemble_nll": ensemble_nll.sum(),
                "member_nll": nll.mean(0).sum(),
                "errors": (combine(eta).argmax(-1) != target).sum(),
                "member_errors": (eta.argmax(-1) != target).sum(1),  # (M,)
                "member_entropy": -(logp.exp() * logp).sum(-1).sum(1),  # (M,)
            }
        else:
            m, n, k = eta.shape
            y = target.reshape(n, k).to(eta.dtype)
            # predict() takes the inverse link of the member mean; a (1, M*N, K) view
            # makes that mean trivial so each member's own prediction comes out.
            member_pred = predict(eta.reshape(1, m * n, k), self.family).reshape(m, n, k)
            sums = {
                "ensemble_nll": ensemble_nll.sum(),
                "member_nll": member_nll(eta, target, self.family).mean(0).sum(),
                "errors": (predict(eta, self.family) - y).square().sum(),
                "member_errors": (member_pred - y).square().sum((1, 2)),  # (M,)
                "target_sum": y.sum(0),  # (K,), for the constant-predictor "chance" RMSE
                "target_sq_sum": y.square().sum(0),  # (K,)
            }
        for key, value in sums.items():
            value = value.to(torch.float64)
            self._sums[key] = self._sums[key] + value if key in self._sums else value
        self.count += eta.shape[1]
        self.num_classes = eta.shape[2]

    def compute(self) -> dict[str, float | int | list[float]]:
        """The epoch's metrics (scalars, plus the per-member vectors ``member_errors`` and,
        for categorical targets, ``member_entropy``); one host transfer."""
        if self.count == 0:
            raise ValueError("EpochMetrics.compute() called before any update()")
        keys = list(self._sums)
        flat = torch.cat([self._sums[key].reshape(-1) for key in keys]).cpu()  # the one sync
        sizes = [self._sums[key].numel() for key in keys]
        sums = dict(zip(keys, flat.split(sizes), strict=True))
        n = self.count

        ensemble = sums["ensemble_nll"].item() / n
        members = sums["member_nll"].item() / n
        out: dict[str, float | int | list[float]] = {
            "loss": self.lam * ensemble + (1 - self.lam) * members,
            "ensemble_nll": ensemble,
            "member_nll": members,
            "ambiguity": members - ensemble,  # Eq. (6): mean_j KL(q_bar || q_j)
        }
        if self.family == "categorical":
            error = sums["errors"].item() / n
            member_errors = sums["member_errors"] / n
            chance = 1 - 1 / self.num_classes  # a uniform guess
        else:
            num_classes = sums["target_sum"].numel()
            error = math.sqrt(sums["errors"].item() / (n * num_classes))
            member_errors = (sums["member_errors"] / (n * num_classes)).sqrt()
            mean = sums["target_sum"] / n
            # RMSE of the best constant prediction (the split's per-output mean).
            chance = (sums["target_sq_sum"] / n - mean.square()).clamp_min(0).mean().sqrt().item()
        out.update(_error_summary(error, member_errors, chance))
        if self.family == "categorical":
            entropy = sums["member_entropy"] / n
            out["entropy_mean"] = entropy.mean().item()
            out["member_entropy"] = entropy.tolist()
        return out


def _error_summary(
    error: float, member_errors: Tensor, chance: float
) -> dict[str, float | int | list[float]]:
    """Ensemble/member error statistics and the dominance signal; ``chance`` is the error
    of a predictor that ignores the input."""
    return {
        "error": error,
        "member_error_min": member_errors.min().item(),
        "member_error_mean": member_errors.mean().item(),
        "member_error_max": member_errors.max().item(),
        "member_errors": member_errors.tolist(),
        "best_member": int(member_errors.argmin().item()),
        "dominance_gap": member_errors.min().item() - error,
        "members_near_chance": int((member_errors >= NEAR_CHANCE_FRACTION * chance).sum().item()),
    }


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    family: str,
    lam: float,
    batch_size: int = 1000,
    keep_eta: bool = False,
) -> tuple[dict[str, float | int | list[float]], Tensor | None]:
    """Metrics of ``model`` on ``(x, y)`` in eval mode, batched, without gradients.

    Returns the metrics of :meth:`EpochMetrics.compute` and, with ``keep_eta=True``, the
    member natural parameters ``(M, N, K)`` on the host.
    """
    was_training = model.training
    model.eval()
    acc = EpochMetrics(family, lam)
    kept: list[Tensor] = []
    for start in range(0, x.shape[0], batch_size):
        eta = model(x[start : start + batch_size])  # (M, B, K)
        acc.update(eta, y[start : start + batch_size])
        if keep_eta:
            kept.append(eta)
    model.train(was_training)
    return acc.compute(), torch.cat(kept, dim=1).cpu() if keep_eta else None
