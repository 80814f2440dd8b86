"""Block-diagonal rotations with a channel permutation between them (DuQuant's online transform).

    x -> x R1 P R2      R1, R2 block-diagonal [n_blocks, B, B], P a permutation (x P = x[..., perm])

One pure function, `apply_blocks`, serves both sides: the online module applies it to the
activations, and folding applies it to a reader's weight (W <- W R1 P R2, the input side of an
orthogonal transform), so the two can never disagree.

Design choices:
* Sizes the block size does not divide (576 = 4 * 128 + 64; tiny test models): the last
  block is *ragged*, of size r = n mod B, and stored padded to [B, B] with the identity on
  the rows / columns past r. Applying zero-pads x to n_blocks * B, multiplies, and drops the
  padding again: exact, since the padded inputs are zero and the identity keeps them apart
  from the first r outputs. `check_blocks` verifies that padding (and orthogonality).
* The permutation is stored as an index vector (int64), the matrices as dense blocks: what a
  kernel would read. Both are optional (R1 alone: one block rotation, no permutation).
* Cost per token (FLOPs, a multiply-add = 2): 2 * n_blocks * B^2 per block rotation, the
  permutation is a gather (0 FLOPs). `block_flops` says it once for the cost tables.
"""

from __future__ import annotations

import math

import torch


def n_blocks(n: int, block: int) -> int:
    return math.ceil(n / block)


def block_sizes(n: int, block: int) -> list[int]:
    """The real size of each block: all `block`, the last one ragged when block does not divide n."""
    full, rest = divmod(n, block)
    return [block] * full + ([rest] if rest else [])


def _block_apply(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """x [..., n] times the block-diagonal matrix of `blocks` [nb, B, B] (last block maybe ragged)."""
    n = x.shape[-1]
    nb, b, _ = blocks.shape
    pad = nb * b - n
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    y = torch.einsum("...ki,kij->...kj", x.reshape(*x.shape[:-1], nb, b), blocks.to(x.dtype))
    y = y.reshape(*x.shape[:-1], nb * b)
    return y[..., :n] if pad else y


def apply_blocks(x: torch.Tensor, r1: torch.Tensor, perm: torch.Tensor | None = None,
                 r2: torch.Tensor | None = None) -> torch.Tensor:
    """x R1 P R2 on the last dimension (pure; dtype of x)."""
    y = _block_apply(x, r1)
    if perm is not None:
        y = y.index_select(-1, perm.to(y.device))
    if r2 is not None:
        y = _block_apply(y, r2)
    return y


def dense_matrix(n: int, r1: torch.Tensor, perm=None, r2=None) -> torch.Tensor:
    """The n x n matrix R1 P R2 (tests and checks only: O(n^2) memory)."""
    return apply_blocks(torch.eye(n, dtype=torch.float64, device=r1.device), r1.double(), perm,
                        None if r2 is None else r2.double())


def pad_block(m: torch.Tensor, block: int) -> torch.Tensor:
    """An r x r rotation stored as the [block, block] matrix diag(m, I)."""
    r = m.shape[-1]
    out = torch.eye(block, dtype=m.dtype, device=m.device)
    out[:r, :r] = m
    return out


def check_blocks(name: str, n: int, r1: torch.Tensor, perm: torch.Tensor | None, r2: torch.Tensor | None,
                 tol: float = 1e-4) -> None:
    """ValueError unless r1 / r2 are [ceil(n/B), B, B] orthogonal blocks with identity padding and
    perm is a permutation of range(n)."""
    for which, m in (("r1", r1), ("r2", r2)):
        if m is None:
            continue
        if m.dim() != 3 or m.shape[1] != m.shape[2] or m.shape[0] != n_blocks(n, m.shape[1]):
            raise ValueError(f"{name}.{which} has shape {tuple(m.shape)}; {n} channels need "
                             f"[ceil({n} / B), B, B] blocks")
        d = m.double()
        eye = torch.eye(d.shape[-1], dtype=d.dtype, device=d.device)
        err = (d @ d.transpose(-1, -2) - eye).abs().max().item()
        if not err <= tol:  # also refuses NaN
            raise ValueError(f"{name}.{which} is not orthogonal (max |R R^T - I| = {err:.2e})")
        r = n - (m.shape[0] - 1) * m.shape[1]
        if r < m.shape[1]:
            last = d[-1]
            off = torch.cat([last[r:, :r].reshape(-1), last[:r, r:].reshape(-1)])
            if off.numel() and off.abs().max().item() > tol or \
                    (last[r:, r:] - eye[r:, r:]).abs().max().item() > tol:
                raise ValueError(f"{name}.{which}: the ragged last block ({r} of {m.shape[1]} channels) "
                                 "must be padded with the identity")
    if perm is not None:
        if perm.shape != (n,) or perm.dtype != torch.int64 or \
                not torch.equal(torch.sort(perm).values, torch.arange(n, device=perm.device)):
            raise ValueError(f"{name}.perm must be a permutation of range({n}) (int64)")


def block_flops(n: int, block: int, rotations: int) -> int:
    """FLOPs per token of `rotations` block-diagonal products over n channels (the permutation is free)."""
    return rotations * 2 * sum(b * b for b in block_sizes(n, block))


class BlockSet:
    """(R1, perm, R2) of one transform, for all layers ([L, nb, B, B], [L, n], [L, nb, B, B]) or,
    indexed, for one layer. perm / r2 may be None (no permutation / no second rotation)."""

    def __init__(self, r1: torch.Tensor, perm: torch.Tensor | None = None, r2: torch.Tensor | None = None):
        self.r1, self.perm, self.r2 = r1, perm, r2

    def __getitem__(self, i: int) -> BlockSet:
        return BlockSet(self.r1[i], None if self.perm is None else self.perm[i], None if self.r2 is None else self.r2[i])

    def to(self, device=None, dtype=None) -> BlockSet:
        def mat(m):
            return None if m is None else m.to(device, dtype)
        return BlockSet(mat(self.r1), None if self.perm is None else self.perm.to(device), mat(self.r2))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return apply_blocks(x, self.r1, self.perm, self.r2)

    @property
    def n_rotations(self) -> int:
        return 1 + (self.r2 is not None)
