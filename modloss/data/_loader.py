"""Batches, augmentation and shifted copies of images on the tensors' own device, without
host syncs."""

import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor


def random_crop_flip(
    x: Tensor, generator: torch.Generator | None = None, padding: int = 4
) -> Tensor:
    """Random `padding`-pixel-pad crop, then random horizontal flip, of every image in `x`.

    Equivalent to zero-padding each image by `padding` on every side, cropping a random
    (H, W) window and mirroring it with probability 1/2, but done as one gather over the
    batch on `x`'s device (no per-image loop, no padded copy, no host sync).

    Shape: x (N, C, H, W) -> (N, C, H, W).
    """
    if x.dim() != 4:
        raise ValueError(f"x has shape {tuple(x.shape)}; expected (N, C, H, W)")
    if padding < 0:
        raise ValueError(f"padding={padding}: expected a non-negative number of pixels")
    n, c, h, w = x.shape

    def draw(high: int) -> Tensor:  # (N, 1) ints in [0, high)
        return torch.randint(0, high, (n, 1), generator=generator, device=x.device)

    dy, dx, flip = draw(2 * padding + 1), draw(2 * padding + 1), draw(2).bool()
    rows = dy - padding + torch.arange(h, device=x.device)  # (N, H) source rows
    cols = dx - padding + torch.arange(w, device=x.device)  # (N, W) source cols
    cols = torch.where(flip, cols.flip(1), cols)
    inside = ((rows >= 0) & (rows < h)).unsqueeze(2) & ((cols >= 0) & (cols < w)).unsqueeze(1)
    src = rows.clamp(0, h - 1).unsqueeze(2) * w + cols.clamp(0, w - 1).unsqueeze(1)  # (N, H, W)
    out = x.reshape(n, c, h * w).gather(2, src.view(n, 1, h * w).expand(n, c, h * w))
    return torch.where(
        inside.view(n, 1, h, w),
        out.view(n, c, h, w),
        torch.zeros((), dtype=x.dtype, device=x.device),
    )


def rotate(x: Tensor, degrees: float, *, fill: float | Tensor = 0.0) -> Tensor:
    """Every image of ``x`` rotated counter-clockwise by ``degrees`` about its centre.

    Output pixel ``p`` (centre-relative coordinates, x right, y up) takes the bilinear
    interpolation of the input at ``R(-degrees) p``, in one ``affine_grid`` / ``grid_sample``
    over the batch on ``x``'s device; what comes from outside the image is ``fill`` (a number,
    or one value per channel: for standardised images, the standardised black,
    ``-x_mean / x_std``). Multiples of 90 degrees move pixel centres onto pixel centres, so
    they equal ``torch.rot90`` up to rounding.

    Shape: x (N, C, H, H) -> (N, C, H, H); only square images (rotating a non-square one
    would need a canvas of another shape).
    """
    if x.dim() != 4 or x.shape[2] != x.shape[3]:
        raise ValueError(f"x has shape {tuple(x.shape)}; expected square images (N, C, H, H)")
    if not math.isfinite(degrees):
        raise ValueError(f"degrees must be a finite number, got {degrees!r}")
    fill = torch.as_tensor(fill, dtype=x.dtype, device=x.device).reshape(-1)
    if fill.numel() not in (1, x.shape[1]):
        raise ValueError(f"fill has {fill.numel()} values; expected 1 or C = {x.shape[1]}")
    fill = fill.view(1, -1, 1, 1)
    angle = math.radians(degrees)
    cos, sin = math.cos(angle), math.sin(angle)
    # affine_grid's y axis points down, so a counter-clockwise turn has the sign of sin flipped.
    theta = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=x.dtype, device=x.device)
    # Every image has the same grid: made once and broadcast over the batch.
    grid = F.affine_grid(theta[None], [1, *x.shape[1:]], align_corners=False)
    grid = grid.expand(len(x), -1, -1, -1)
    # Zero padding of x - fill, then + fill: outside pixels become fill, edges blend into it.
    out = F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out + fill


class DeviceLoader:
    """Batches `(x[i], y[i])` on the tensors' own device.

    Each epoch (each `iter`) draws one permutation on the device when `shuffle`, from
    `generator` (which must live on that device) or the global RNG; batches are gathered by
    index on the device and `augment(x_batch, generator)` is applied to each, so nothing
    waits for the host between batches. `drop_last` drops the final short batch.
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        batch_size: int,
        *,
        shuffle: bool = False,
        augment: Callable[[Tensor, torch.Generator | None], Tensor] | None = None,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
    ) -> None:
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} examples but y has {len(y)}")
        if x.device != y.device:
            raise ValueError(f"x is on {x.device} but y is on {y.device}")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: expected a positive integer")
        if generator is not None and generator.device.type != x.device.type:
            raise ValueError(f"generator is on {generator.device} but the data is on {x.device}")
        self.x, self.y, self.batch_size = x, y, batch_size
        self.shuffle, self.drop_last = shuffle, drop_last
        self.augment, self.generator = augment, generator

    def __len__(self) -> int:
        n = len(self.x)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        bs, order = self.batch_size, None
        if self.shuffle:
            order = torch.randperm(len(self.x), generator=self.generator, device=self.x.device)
        for start in range(0, len(self) * bs, bs):
            if order is None:
                xb, yb = self.x[start : start + bs], self.y[start : start + bs]
            else:
                index = order[start : start + bs]
                xb, yb = self.x.index_select(0, index), self.y.index_select(0, index)
            if self.augment is not None:
                xb = self.augment(xb, self.generator)
            yield xb, yb
