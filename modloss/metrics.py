"""Batched per-epoch metrics of an ensemble: losses, errors, calibration, entropy,
disagreement and module dominance.

Everything is computed from member natural parameters ``eta`` of shape ``(M, N, K)`` with
tensor operations over all members at once. :class:`EpochMetrics` keeps running sums as
tensors on the device of ``eta``; :meth:`EpochMetrics.compute` moves them to the host in a
single transfer, so an epoch costs one host synchronisation per split, not one per batch.

``error`` depends on the family: for ``"categorical"`` it is the misclassification rate of
the ensemble (argmax of the mean logits); for ``"gaussian"`` and ``"poisson"`` it is the
root-mean-square error of the ensemble mean ``predict(eta)`` (averaged over examples and
the K outputs). Per-member errors use each member's own prediction the same way.

Calibration (categorical only), with ``p = softmax(eta_bar)`` the ensemble prediction and
``p_j = softmax(eta_j)`` member j's:

- ``brier``: ``(1/N) sum_i sum_k (p_ik - [y_i = k])^2``, summed over classes (in [0, 2]), as
  torch-uncertainty and Ovadia et al. report it;
- ``ece``: ``sum_b |sum_{i in b} (conf_i - [pred_i = y_i])| / N`` over 15 equal-width bins
  of the top-label confidence ``conf_i = max_k p_ik`` (``pred_i`` its argmax), binned as
  torchmetrics' ``MulticlassCalibrationError(n_bins=15, norm="l1")`` does (see
  :func:`confidence_bins`);
- ``member_brier`` / ``member_ece``: the mean over members of each member's own Brier
  score / ECE (and ``member_nll`` the mean of their NLLs);
- ``disagreement``: ``(1/N) sum_i (1/M) sum_j [argmax p_ij != argmax p_i]``, the mean
  fraction of members that disagree with the ensemble's class.

Robustness to dropped members: :func:`dropped_error` is the ensemble's error with 90% of
its members dropped at random, :func:`kept_members` (ceil(M / 10), at least one, kept).

Module dominance (the paper's section 4.2): ``dominance_gap`` is the best member's error
minus the ensemble's error. Independent members make an ensemble clearly better than its
best member (large gap); when one module carries the ensemble the gap shrinks towards zero
while ``members_near_chance`` counts the modules left near chance level.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from modloss.losses import FAMILIES, LOG_TINY, CategoricalSoftmax, member_nll, predict

__all__ = [
    "DROP_PERCENT",
    "ECE_BINS",
    "MEMBER_KEYS",
    "NEAR_CHANCE_FRACTION",
    "EpochMetrics",
    "calibration_gaps",
    "confidence_bins",
    "dropped_error",
    "evaluate",
    "evaluate_groups",
    "kept_members",
    "member_entropy",
]

# A member counts as "near chance" once its error is within 10% of chance level: close
# enough to flag modules that stayed near initialisation, loose enough to ignore noise.
NEAR_CHANCE_FRACTION = 0.9
# Equal-width confidence bins of the ECE: 15, as Guo et al., Ovadia et al. and
# torch-uncertainty use.
ECE_BINS = 15
# dropped_error: the share of members dropped, in percent (the paper's Fig. 4 reads its
# robustness at ~90% dropped).
DROP_PERCENT = 90
# Logits per slice of a CPU batch in the categorical metrics (1 MB of float32), and how
# many logits of small batches are gathered before they are computed.
_CHUNK_ELEMENTS = 2**18
# Entries of EpochMetrics.state() with a leading member dimension (M, ...); every other
# entry is an ensemble-level sum over examples.
MEMBER_KEYS = frozenset(
    {
        "member_nll",
        "member_errors",
        "member_entropy",
        "member_brier",
        "member_ece_gaps",
        "member_disagreements",
    }
)


def member_entropy(eta: Tensor) -> Tensor:
    """Predictive entropy (nats) of each member's categorical prediction: (M, N, K) -> (M, N)."""
    # Classes first: a softmax over a short last dimension runs 3x slower on CPU.
    logp = torch.log_softmax(eta.transpose(-1, -2).contiguous(), dim=-2)
    return -(logp.exp() * logp).sum(-2)


def confidence_bins(confidence: Tensor, n_bins: int = ECE_BINS) -> Tensor:
    """Index of the equal-width calibration bin of each confidence in [0, 1], as int64.

    Bin ``b`` holds ``edge_b <= confidence < edge_{b+1}`` with ``edges = linspace(0, 1,
    n_bins + 1)`` in the confidence's dtype, exactly as torchmetrics' binning
    (``bucketize(confidence, edges, right=True) - 1``): a confidence on an edge belongs to
    the bin above it, and a confidence of exactly 1 (a saturated float32 softmax) gets an
    extra index ``n_bins`` of its own. So the result lies in ``[0, n_bins]``.
    """
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive int, got {n_bins!r}")
    edges = _bin_edges(n_bins, confidence.dtype, confidence.device)
    # Rounding (of c * n, or of the float edges) can put c on the wrong side of only the
    # edge nearest to it, b = round(c * n): the others are about a bin away (this holds
    # while n_bins is far below 1 / eps of the dtype). So c's bin is b - 1, plus one if c
    # reaches edge b: one look-up and one comparison, under half the cost of correcting
    # floor(c * n) on both sides. b >= 1 keeps every index, a NaN's too, in range.
    nearest = (confidence * n_bins).round_().long().clamp_(1, n_bins)
    # index_select on the flat index: a third of the time of take() or indexing on CPU.
    reached = confidence >= edges.index_select(0, nearest.view(-1)).view_as(confidence)
    return nearest.sub_(1).add_(reached)


@functools.cache
def _bin_edges(n_bins: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``linspace(0, 1, n_bins + 1)``, the bin edges of :func:`confidence_bins`."""
    return torch.linspace(0, 1, n_bins + 1, dtype=dtype, device=device)


@functools.cache
def _first_max_weights(k: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.arange(k, 0, -1, dtype=dtype, device=device).view(k, 1, 1)  # (K, 1, 1)


def calibration_gaps(confidence: Tensor, correct: Tensor, n_bins: int = ECE_BINS) -> Tensor:
    """Per-bin sums of ``confidence - correct``: ``(..., N) -> (..., n_bins + 1)`` float64.

    The l1 ECE of the examples is ``gaps.abs().sum(-1) / N``: a bin's term
    ``|acc_b - conf_b| * n_b / N`` equals ``|sum_{i in b} (conf_i - correct_i)| / N``. Unlike
    the ECE itself these sums add up over batches and over disjoint example shards. Leading
    dimensions (members) are binned separately, in one scatter. Bins are
    :func:`confidence_bins`.
    """
    if confidence.shape != correct.shape:
        raise ValueError(
            f"confidence has shape {tuple(confidence.shape)} but correct has "
            f"{tuple(correct.shape)}; expected the same shape"
        )
    slots = n_bins + 1
    lead = confidence.shape[:-1]
    rows = math.prod(lead)
    index = confidence_bins(confidence, n_bins).view(rows, -1)
    index += torch.arange(0, rows * slots, slots, device=index.device).view(rows, 1)
    # In float32 conf - 1 rounds by at most 2^-25 (exact for conf >= 1/2), far below what
    # an ECE shows; the sums are float64.
    gap = (confidence - correct.to(confidence.dtype)).to(torch.float64).view(-1)
    out = torch.zeros(rows * slots, dtype=torch.float64, device=confidence.device)
    # scatter_add_, not index_add_: the same sums, in half the time on CPU.
    return out.scatter_add_(0, index.view(-1), gap).view(*lead, slots)


_Batch = tuple[Tensor, Tensor, Tensor]  # eta (M, N, K), target (N,), eta_bar (N, K)


def _categorical_sums(batches: list[_Batch]) -> dict[str, Tensor]:
    """The categorical sums over the examples of ``batches`` (float64), all with the same
    M and K; see :meth:`EpochMetrics.state`.

    The batches are regrouped into chunks of about ``_CHUNK_ELEMENTS`` logits on the CPU:
    small batches together (the dozen small ops of a pass then serve many of them), large
    ones in slices (the temporaries then stay in the cache and below the allocator's mmap
    threshold, where a (10, 256, 1000) evaluation batch spent more time on page faults of
    fresh 10 MB buffers than on arithmetic). Elsewhere every batch is one chunk.
    """
    m, _, k = batches[0][0].shape
    cpu = batches[0][0].device.type == "cpu"
    step = max(1, _CHUNK_ELEMENTS // (m * k))
    total: dict[str, Tensor] = {}
    chunk: list[_Batch] = []
    size = 0

    def add(chunk: list[_Batch]) -> None:
        for key, value in _categorical_chunk(chunk).items():
            total[key] = total[key] + value if key in total else value

    for eta, target, eta_bar in batches:
        n = eta.shape[1]
        starts = range(0, max(n, 1), step) if cpu else [0]  # an empty batch gives every key
        for lo in starts:
            hi = lo + step if cpu else n
            chunk.append((eta[:, lo:hi], target[lo:hi], eta_bar[lo:hi]))
            size += chunk[-1][1].numel() * m * k
            if size >= _CHUNK_ELEMENTS or not cpu:
                add(chunk)
                chunk, size = [], 0
    if chunk:
        add(chunk)
    return total


def _categorical_chunk(batches: list[_Batch]) -> dict[str, Tensor]:
    m, _, k = batches[0][0].shape
    eta = batches[0][0]
    work = torch.promote_types(eta.dtype, torch.float32)
    # The members and the ensemble side by side, classes leading, as in the loss: every
    # reduction over classes runs over the leading dimension (5-20x faster on CPU than over
    # a contiguous last dimension of 10, REFERENCE.md), once for all M + 1 predictions.
    # Each batch is copied straight into its columns: the copy is also the concatenation.
    target = torch.cat([t for _, t, _ in batches]) if len(batches) > 1 else batches[0][1]
    z = torch.empty((k, m + 1, len(target)), dtype=work, device=eta.device)
    start = 0
    for part, t, part_bar in batches:
        columns = z.narrow(2, start, len(t))
        columns[:, :m].copy_(part.permute(2, 0, 1))
        columns[:, m].copy_(part_bar.t())
        start += len(t)
    z.sub_(z.amax(0))  # shifted logits
    # Clamped as the loss does (see losses.LOG_TINY): no denormal numerators, whose squares
    # would be denormals too.
    numerators = z.clamp(min=LOG_TINY).exp_()
    return _softmax_sums(CategoricalSoftmax(z, numerators, numerators.sum(0)), target)


def _softmax_sums(softmax: CategoricalSoftmax, target: Tensor) -> dict[str, Tensor]:
    """The categorical sums (see :meth:`EpochMetrics.state`) of the examples of
    ``softmax``, with ``target`` ``(N,)``; overwrites ``softmax.shifted``."""
    k, rows, _ = softmax.shifted.shape
    m = rows - 1
    stats = _softmax_stats(softmax, target)  # each (M + 1, N)
    correct = stats["pred"] == target
    wrong = (~correct).sum(1, dtype=torch.float64)
    gaps = calibration_gaps(stats["conf"], correct)  # (M + 1, B + 1)
    disagree = (stats["pred"][:m] != stats["pred"][m]).sum(1, dtype=torch.float64)
    nll, brier = (stats[key].sum(1, dtype=torch.float64) for key in ("nll", "brier"))
    return {
        "ensemble_nll": nll[m],
        "errors": wrong[m],
        "brier": brier[m],
        "ece_gaps": gaps[m],  # (B + 1,)
        "class_counts": torch.bincount(target, minlength=k).to(torch.float64),  # (K,)
        "count": torch.tensor(len(target), dtype=torch.float64, device=target.device),
        "member_nll": nll[:m],  # (M,)
        "member_errors": wrong[:m],  # (M,)
        "member_entropy": stats["entropy"][:m].sum(1, dtype=torch.float64),  # (M,)
        "member_brier": brier[:m],  # (M,)
        "member_ece_gaps": gaps[:m],  # (M, B + 1)
        "member_disagreements": disagree,  # (M,)
    }


def _softmax_stats(softmax: CategoricalSoftmax, target: Tensor) -> dict[str, Tensor]:
    """NLL, entropy, Brier score, top-label confidence and argmax of the rows of
    ``softmax`` ``(K, R, N)``, with ``target`` ``(N,)``: each ``(R, N)``. Overwrites
    ``softmax.shifted``.

    With ``t`` the shifted logits, ``e = exp(t)`` and ``s = sum_k e_k``: ``p_k = e_k / s``,
    the top probability is ``1 / s``, ``NLL = log s - t_y``, ``H = log s - sum_k e_k t_k / s``
    and ``Brier = sum_k p_k^2 - 2 p_y + 1``. One exp over the logits serves them all.
    """
    t, e, s = softmax
    k, r, n = t.shape
    t_y = t.gather(0, target.view(1, 1, n).expand(1, r, n)).squeeze(0)  # unclamped: the NLL
    # Every pass below runs in t's buffer: a fresh (K, R, N) buffer per batch cost more in
    # page faults than the arithmetic on it (5x for sign() of 256 members).
    et = t.clamp_(min=LOG_TINY).mul_(e)  # e_k t_k, t clamped as in the numerators
    et_sum = et.sum(0)
    # The first maximum, as argmax(0) but ~40x faster on CPU: e_k t_k is 0 exactly at the
    # maxima (t_k = 0) and negative elsewhere (e_k >= exp(LOG_TINY)), so its sign + 1 is 1
    # at the maxima and 0 elsewhere; weights K..1 make the first one win the amax.
    weights = _first_max_weights(k, t.dtype, t.device)
    pred = k - et.sign_().add_(1).mul_(weights).amax(0).long()
    e_sq_sum = torch.mul(e, e, out=t).sum(0)
    log_s = s.log()
    conf = s.reciprocal()
    brier = (e_sq_sum * conf - 2 * t_y.exp()) * conf + 1
    entropy = log_s - et_sum * conf
    return {"nll": log_s - t_y, "entropy": entropy, "brier": brier, "conf": conf, "pred": pred}


def _check_classes(target: object, n: int, k: int) -> None:
    if not isinstance(target, Tensor) or target.dtype != torch.int64 or target.shape != (n,):
        got = (target.dtype, tuple(target.shape)) if isinstance(target, Tensor) else target
        raise ValueError(f"target must be int64 class indices of shape ({n},), got {got}")
    # Only on the CPU: elsewhere the check would cost a host sync per batch.
    if target.device.type == "cpu" and n > 0:
        low, high = (int(v) for v in torch.aminmax(target))
        if low < 0 or high >= k:
            raise ValueError(f"target holds classes outside [0, {k}): min {low}, max {high}")


class EpochMetrics:
    """Running sums of the per-epoch metrics for one split, kept on the device.

    Args:
        family: ``"categorical"``, ``"gaussian"`` or ``"poisson"``.
        lam: the modular-loss weight; ``loss = lam * ensemble_nll + (1 - lam) * member_nll``.

    Call :meth:`update` with detached ``eta`` for every batch, then :meth:`compute` once.

    Distributed training: the running state (:meth:`state`) is a dict of tensors, every one
    a SUM over the examples seen, either ensemble-level or with a leading member dimension
    (the keys in :data:`MEMBER_KEYS`: ``member_nll``, ``member_errors``, ``member_entropy``,
    ``member_brier``, ``member_ece_gaps``, ``member_disagreements``). The ensemble-level
    keys are ``count``, ``ensemble_nll``, ``errors``, and ``brier``, ``ece_gaps`` and
    ``class_counts`` (categorical) or ``target_sum`` and ``target_sq_sum`` (regression).
    So parts merge exactly with :meth:`merged`: over disjoint example slices (DDP) by
    adding, over disjoint member shards (module parallel, every rank passing the
    all-reduced ensemble parameter as ``eta_bar``) by concatenating the member entries.
    """

    def __init__(self, family: str, lam: float) -> None:
        if family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
        if isinstance(lam, bool) or not isinstance(lam, int | float) or not 0 <= lam <= 1:
            raise ValueError(f"lam must be a number in [0, 1], got {lam!r}")
        self.family = family
        self.lam = float(lam)
        self.count = 0
        self._sums: dict[str, Tensor] = {}
        # Categorical batches wait here until they hold _CHUNK_ELEMENTS logits: one pass
        # over 262 batches of a lone member costs what one pass over a single batch does.
        # Batches with the loss's softmax wait apart, for one pass over their concatenation.
        self._pending: list[tuple[Tensor, Tensor, Tensor]] = []
        self._pending_softmax: list[tuple[CategoricalSoftmax, Tensor]] = []
        self._pending_elements = 0
        self._pending_shape: tuple[int, int] | None = None  # (M, K) of the waiting batches

    @torch.no_grad()
    def update(
        self,
        eta: Tensor,
        target: Tensor,
        *,
        eta_bar: Tensor | None = None,
        softmax: CategoricalSoftmax | None = None,
    ) -> None:
        """Add one batch: ``eta`` (M, N, K), ``target`` (N,) classes or (N, K) values.

        ``eta_bar`` (N, K) is the ensemble natural parameter, by default the mean of
        ``eta`` over members; pass it when ``eta`` holds only some of the members (module
        parallel: this rank's shard, with the all-reduced mean of all members).

        ``softmax`` is the :class:`~modloss.losses.CategoricalSoftmax` that the loss of this
        same batch computed (:func:`~modloss.losses.modular_loss_and_softmax`), ensemble
        row included: the batch is then computed at once from it, without a softmax of its
        own (a training step's metrics cost a third less), and its ``shifted`` overwritten.

        Other categorical batches are computed once they add up to about 2^18 logits (or
        at :meth:`state` / :meth:`compute`); until then a reference to ``eta`` is kept, so
        do not modify it in place.
        """
        if not isinstance(eta, Tensor) or eta.dim() != 3:
            shape = tuple(eta.shape) if isinstance(eta, Tensor) else type(eta).__name__
            raise ValueError(f"eta must be a tensor of shape (M, N, K), got {shape}")
        eta = eta.detach()
        m, n, k = eta.shape
        if softmax is not None:
            self._check_softmax(softmax, eta_bar, (k, m + 1, n))
        elif eta_bar is None:
            eta_bar = eta.mean(0)
        elif not isinstance(eta_bar, Tensor) or eta_bar.shape != (n, k):
            shape = tuple(eta_bar.shape) if isinstance(eta_bar, Tensor) else eta_bar
            raise ValueError(f"eta_bar must have shape (N, K) = ({n}, {k}), got {shape}")
        else:
            eta_bar = eta_bar.detach()
        if self.family == "categorical":
            _check_classes(target, n, k)
            if self._pending_shape not in (None, (m, k)):
                seen = self._pending_shape
                raise ValueError(f"eta has (M, K) = {(m, k)}, but earlier batches had {seen}")
            if softmax is not None:
                # Softmaxes are joined only while they fit in one chunk: copies into bigger
                # buffers cost more (in page faults) than the passes they save.
                if self._pending_elements + eta.numel() > _CHUNK_ELEMENTS:
                    self._flush()
                self._pending_softmax.append((softmax, target))
            else:
                self._pending.append((eta, target, eta_bar))
            self._pending_shape = (m, k)
            self._pending_elements += eta.numel()
            if self._pending_elements >= _CHUNK_ELEMENTS:
                self._flush()
        else:
            # The ensemble NLL also validates target's dtype and shape.
            ensemble_nll = member_nll(eta_bar.unsqueeze(0), target, self.family)[0]  # (N,)
            y = target.reshape(n, k).to(eta.dtype)
            # predict() takes the inverse link of the member mean; a (1, M*N, K) view
            # makes that mean trivial so each member's own prediction comes out.
            member_pred = predict(eta.reshape(1, m * n, k), self.family).reshape(m, n, k)
            self._add(
                {
                    "ensemble_nll": ensemble_nll.sum(),
                    "errors": (predict(eta_bar.unsqueeze(0), self.family) - y).square().sum(),
                    "target_sum": y.sum(0),  # (K,), for the constant-predictor "chance" RMSE
                    "target_sq_sum": y.square().sum(0),  # (K,)
                    "member_nll": member_nll(eta, target, self.family).sum(1),  # (M,)
                    "member_errors": (member_pred - y).square().sum((1, 2)),  # (M,)
                    "count": torch.tensor(n, device=eta.device),
                }
            )
        self.count += n

    def _check_softmax(
        self, softmax: object, eta_bar: Tensor | None, shape: tuple[int, int, int]
    ) -> None:
        if self.family != "categorical":
            raise ValueError(f"softmax is for family='categorical', not {self.family!r}")
        if eta_bar is not None:
            raise ValueError("pass eta_bar or softmax, not both: softmax holds the ensemble")
        if not isinstance(softmax, CategoricalSoftmax):
            raise ValueError(f"softmax must be a CategoricalSoftmax, got {type(softmax).__name__}")
        if softmax.shifted.shape != shape:
            raise ValueError(
                f"softmax has shape {tuple(softmax.shifted.shape)}, expected (K, M + 1, N) = "
                f"{shape} for eta of shape (M, N, K)"
            )

    def _flush(self) -> None:
        """Compute the pending categorical batches."""
        batches, softmaxes = self._pending, self._pending_softmax
        self._pending, self._pending_softmax = [], []
        self._pending_elements, self._pending_shape = 0, None
        if batches:
            self._add(_categorical_sums(batches))
        if len(softmaxes) == 1:
            self._add(_softmax_sums(*softmaxes[0]))
        elif softmaxes:  # fields side by side along the examples, the last dimension
            fields = zip(*(softmax for softmax, _ in softmaxes), strict=True)
            joined = CategoricalSoftmax(*(torch.cat(parts, dim=-1) for parts in fields))
            self._add(_softmax_sums(joined, torch.cat([target for _, target in softmaxes])))

    def _add(self, sums: dict[str, Tensor]) -> None:
        for key, value in sums.items():
            value = value.to(torch.float64)
            if key in self._sums:
                self._sums[key].add_(value)
            else:
                self._sums[key] = value.clone()

    def state(self) -> dict[str, Tensor]:
        """The running sums (see the class docstring): tensors on the device, no sync."""
        self._flush()
        return dict(self._sums)

    @classmethod
    def merged(
        cls,
        parts: list[dict[str, Tensor]],
        *,
        over: Literal["examples", "members"],
        family: str,
        lam: float,
    ) -> EpochMetrics:
        """One accumulator holding the sums of the :meth:`state` ``parts``.

        ``over="examples"``: the parts saw disjoint example slices with all members (DDP);
        every entry is added (empty parts, of ranks that saw no example, are skipped).
        ``over="members"``: the parts saw the same examples with disjoint member shards,
        in rank order (module parallel); member entries are concatenated, ensemble entries
        taken from the first part. Reads ``count`` to the host (one sync).
        """
        if over not in ("examples", "members"):
            raise ValueError(f"over must be 'examples' or 'members', got {over!r}")
        parts = [p for p in parts if p] if over == "examples" else list(parts)
        if not parts or any(not p for p in parts):
            raise ValueError(f"parts must hold at least one non-empty state, got {len(parts)}")
        keys = set(parts[0])
        for i, part in enumerate(parts):
            if set(part) != keys:
                raise ValueError(f"parts[{i}] has keys {sorted(part)}, expected {sorted(keys)}")
        out = cls(family, lam)
        for key in parts[0]:
            if over == "members" and key in MEMBER_KEYS:
                value = torch.cat([p[key] for p in parts])
            elif over == "members":
                value = parts[0][key].clone()
            else:
                value = torch.stack([p[key] for p in parts]).sum(0)
            out._sums[key] = value
        out.count = int(out._sums["count"].item())
        return out

    def compute(self) -> dict[str, float | int | list[float]]:
        """The epoch's metrics (scalars, plus the per-member vectors ``member_errors`` and,
        for categorical targets, ``member_entropy``); one host transfer."""
        if self.count == 0:
            raise ValueError("EpochMetrics.compute() called before any update()")
        self._flush()
        keys = list(self._sums)
        flat = torch.cat([self._sums[key].reshape(-1) for key in keys]).cpu()  # the one sync
        sizes = [self._sums[key].numel() for key in keys]
        sums = {
            key: value.view(self._sums[key].shape)
            for key, value in zip(keys, flat.split(sizes), strict=True)
        }
        n = self.count

        ensemble = sums["ensemble_nll"].item() / n
        members = sums["member_nll"].mean().item() / n
        out: dict[str, float | int | list[float]] = {
            "loss": self.lam * ensemble + (1 - self.lam) * members,
            "ensemble_nll": ensemble,
            "member_nll": members,
            "ambiguity": members - ensemble,  # Eq. (6): mean_j KL(q_bar || q_j)
        }
        if self.family == "categorical":
            error = sums["errors"].item() / n
            member_errors = sums["member_errors"] / n
            chance = 1 - 1 / sums["class_counts"].numel()  # a uniform guess
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
            out["brier"] = sums["brier"].item() / n
            out["ece"] = sums["ece_gaps"].abs().sum().item() / n
            out["member_brier"] = sums["member_brier"].mean().item() / n
            out["member_ece"] = sums["member_ece_gaps"].abs().sum(1).mean().item() / n
            out["disagreement"] = sums["member_disagreements"].mean().item() / n
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


def kept_members(num_members: int, seed: int) -> Tensor:
    """The member ids that survive dropping :data:`DROP_PERCENT` % of ``num_members`` at
    random: ``ceil(M * (100 - DROP_PERCENT) / 100)`` of them (at least one), drawn uniformly
    by a generator seeded with ``seed``, sorted. int64 ``(kept,)``."""
    if isinstance(num_members, bool) or not isinstance(num_members, int) or num_members < 1:
        raise ValueError(f"num_members must be a positive int, got {num_members!r}")
    keep = max(1, -(-num_members * (100 - DROP_PERCENT) // 100))  # ceil, in integers
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(num_members, generator=generator)[:keep].sort().values


@torch.no_grad()
def dropped_error(eta: Tensor, target: Tensor, kept: Tensor, family: str = "categorical") -> float:
    """The ensemble error (as ``error`` of :meth:`EpochMetrics.compute`) of the members
    ``kept`` (ids into the first dimension of ``eta`` ``(M, N, K)``) alone: the
    misclassification rate of the argmax of their mean logits, or the RMSE of their
    ensemble mean (regression). ``target`` is moved to ``eta``'s device."""
    sub = eta.index_select(0, kept.to(eta.device))  # (kept, N, K)
    target = target.to(eta.device)
    if family == "categorical":
        return (sub.mean(0).argmax(-1) != target).double().mean().item()
    pred = predict(sub, family)  # (N, K)
    return (pred - target.reshape(pred.shape).to(pred.dtype)).double().square().mean().sqrt().item()


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
    kw = {"family": family, "batch_size": batch_size, "keep_eta": keep_eta}
    return evaluate_groups(model, x, y, lams=[lam], **kw)[0]


@torch.no_grad()
def evaluate_groups(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    family: str,
    lams: Sequence[float],
    batch_size: int = 1000,
    keep_eta: bool = False,
    groups: Sequence[int] | None = None,
) -> list[tuple[dict[str, float | int | list[float]], Tensor | None] | None]:
    """:func:`evaluate` of each of the ``G = len(lams)`` equal groups of members of
    ``model`` (a pack, :mod:`modloss.pack`: group g is members ``[g*M, (g+1)*M)``, its
    losses at ``lams[g]``) from one forward pass per batch, the data read once for all.

    Returns one entry per group: ``(metrics, eta)`` for the groups in ``groups`` (default:
    all), ``None`` for the others. Each group's ``(M, N, K)`` is filled in place, never held
    as a list of batches for a ``torch.cat`` (which would hold the pack's outputs twice).
    """
    wanted = range(len(lams)) if groups is None else list(groups)
    was_training = model.training
    model.eval()
    metrics = {g: EpochMetrics(family, lams[g]) for g in wanted}
    kept: dict[int, Tensor] = {}
    for start in range(0, x.shape[0], batch_size):
        eta = model(x[start : start + batch_size])  # (G*M, B, K)
        target = y[start : start + batch_size]
        size, rest = divmod(eta.shape[0], len(lams))
        if rest:
            raise ValueError(f"{eta.shape[0]} members do not split into {len(lams)} groups")
        for g in wanted:
            part = eta[g * size : (g + 1) * size]  # (M, B, K)
            metrics[g].update(part, target)
            if keep_eta:
                if g not in kept:
                    kept[g] = part.new_empty((size, x.shape[0], part.shape[2]))
                kept[g][:, start : start + len(target)] = part
    model.train(was_training)
    return [
        (metrics[g].compute(), kept[g].cpu() if g in kept else None) if g in metrics else None
        for g in range(len(lams))
    ]
