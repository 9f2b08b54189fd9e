"""What every ensemble model shares: member selection, per-member seeded initialisation and
extraction of one member as a standalone model."""

import hashlib
from collections.abc import Sequence
from typing import Any, Self

import torch
from torch import Tensor, nn

from modloss.layers import check_positive

__all__ = ["EnsembleModel", "MemberSelection", "member_generator"]

# None (all members), a sequence or 1-D int tensor of member indices, or a bool mask (M,).
MemberSelection = Sequence[int] | Tensor | None


def member_generator(seed: int, j: int) -> torch.Generator:
    """The generator that initialises member ``j`` of a model built with ``seed``.

    Hashing ``(seed, j)`` makes member j's initial weights depend on nothing else: the first
    members of a large ensemble equal those of a small one built with the same seed, and
    seed s's member 1 is not seed s+1's member 0 (as ``seed + j`` would make it).
    """
    digest = hashlib.blake2b(f"{seed}/{j}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little"))


class EnsembleModel(nn.Module):
    """Base class of the ensembles: ``forward(x, members=None)`` returns the member natural
    parameters ``(M', N, K)``.

    Subclasses build their layers (every parameter and buffer has the member dimension
    first, see :mod:`modloss.layers`), set ``self.config`` to their constructor arguments
    without ``seed``, and end ``__init__`` with ``self.reset_parameters(seed)``.
    """

    config: dict[str, Any]

    def __init__(self, num_members: int, num_classes: int) -> None:
        super().__init__()
        check_positive("num_members", num_members)
        check_positive("num_classes", num_classes)
        self.num_members = num_members
        self.num_classes = num_classes

    def reset_parameters(self, seed: int | None = None) -> None:
        """Re-initialise every member; member j from :func:`member_generator` ``(seed, j)``.

        ``seed=None`` draws a seed from the global RNG, so ``torch.manual_seed`` still makes
        the model reproducible.
        """
        if seed is None:
            seed = int(torch.randint(2**62, ()).item())
        elif isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int or None, got {seed!r}")
        for j in range(self.num_members):
            self._init_member(j, member_generator(seed, j))

    def _init_member(self, j: int, generator: torch.Generator) -> None:
        """Initialise member j of every layer; the default is each layer's own scheme."""
        for module in self.modules():
            reset_member = getattr(module, "reset_member", None)
            if module is not self and reset_member is not None:
                reset_member(j, generator)

    def member(self, j: int) -> Self:
        """A standalone one-member model holding a copy of member ``j``'s weights and
        running statistics, in the same mode, dtype and device as this one."""
        if isinstance(j, bool) or not isinstance(j, int) or not 0 <= j < self.num_members:
            raise ValueError(f"j must be an int in [0, {self.num_members}), got {j!r}")
        single = type(self)(**{**self.config, "num_members": 1}, seed=0)
        single.load_state_dict({k: v[j : j + 1].clone() for k, v in self.state_dict().items()})
        reference = next(self.parameters())
        return single.to(device=reference.device, dtype=reference.dtype).train(self.training)

    def _member_index(self, members: MemberSelection) -> Tensor | None:
        """``members`` as a 1-D int64 index on the parameters' device; ``None`` for all
        members in order (the fast path: no weight gathering)."""
        if members is None:
            return None
        m = self.num_members
        index = members.detach().cpu() if isinstance(members, Tensor) else torch.tensor(members)
        if index.dtype == torch.bool:
            if index.shape != (m,):
                raise ValueError(
                    f"members: a bool mask must have shape ({m},), got {tuple(index.shape)}"
                )
            index = index.nonzero().flatten()
        elif index.numel() > 0 and (
            index.is_floating_point() or index.is_complex() or index.ndim != 1
        ):
            raise ValueError(
                f"members must be None, a bool mask of shape ({m},) or a 1-D sequence of "
                f"member indices, got {members!r}"
            )
        if index.numel() == 0:
            raise ValueError("members selects no member; select at least one")
        if int(index.min()) < 0 or int(index.max()) >= m:
            raise ValueError(f"members must be indices in [0, {m}), got {index.tolist()}")
        if index.unique().numel() != index.numel():
            raise ValueError(f"members must not repeat an index, got {index.tolist()}")
        if index.numel() == m and torch.equal(index, torch.arange(m)):
            return None
        return index.to(device=next(self.parameters()).device, dtype=torch.long)
