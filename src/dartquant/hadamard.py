"""Orthonormal Hadamard matrices of the orders LLMs need, and a fast transform.

A Hadamard matrix ``H`` of order ``n`` has entries +-1 and ``H H^T = n I``;
``H / sqrt(n)`` is orthogonal and spreads every coordinate evenly over all the
others, which is what the rotations of QuaRot / SpinQuant / DartQuant use to
remove activation outliers before 4-bit quantization.

Design
------
* **Kronecker construction.**  Hidden / intermediate sizes of real models are
  ``k * 2**m`` with a small odd-ish ``k`` (e.g. 896 = 28 * 32, 4864 = 76 * 64,
  11008 = 172 * 64).  We build ``H_n = H_k (x) H_{2**m}`` (Kronecker product),
  with ``H_{2**m}`` the Sylvester matrix (``H_2 = [[1, 1], [1, -1]]``,
  ``H_{2p} = H_2 (x) H_p``, which is symmetric).  The Kronecker product of
  Hadamard matrices is Hadamard, and it gives a fast transform: writing ``x``
  (length ``n``) as a ``k x 2**m`` matrix ``X`` (row-major),
  ``x @ H_n == vec(H_k^T @ X @ H_{2**m})``: a Walsh-Hadamard butterfly
  (``O(n log n)``) along the ``2**m`` axis and one dense ``k x k`` product
  (``O(n k)``) along the other.  The butterfly uses radix <= 64 stages (each a
  small GEMM with a Sylvester block, since ``H_{2**m}`` is itself a Kronecker
  product of smaller Sylvester matrices): a few times faster than radix 2 in
  PyTorch, where every stage is a pass over memory.
* **Smallest base.**  For ``n = o * 2**v`` (``o`` odd) the usable bases are
  ``k = 1`` (when ``o == 1``) or ``k = o * 2**j`` with ``2 <= j <= v`` (a
  Hadamard order above 2 is a multiple of 4).  We pick the smallest ``k`` for
  which a construction exists, since the dense part costs ``n * k``.  The
  choice is deterministic and must stay so: a model quantized with an online
  Hadamard rotation must see the very same matrix at inference time.
* **Where the bases come from.**
    - Paley I: ``q`` prime, ``q = 3 (mod 4)`` gives order ``q + 1``
      (bases 12, 20, 44, 60, 84, 108, 140, ...).
    - Paley II: ``q`` prime, ``q = 1 (mod 4)`` gives order ``2 (q + 1)``
      (bases 28, 36, 76, 148, ...).
    Both use the Jacobsthal matrix ``Q[i, j] = chi(j - i)`` of the Legendre
    symbol ``chi`` mod ``q``.  Paley I is tried first, then Paley II.  Prime
    powers ``q`` are not implemented.
    - The orders 52, 92, 100, 116, 156, 172, 188, 236, 244 and 428 have no
      such construction; they are read from ``data/hadamard_bases.npz``,
      converted by ``scripts/build_hadamard_bases.py`` from the text files of
      the PyPI package ``exllamav2==0.3.2`` (MIT License; the notice is in the
      npz under the key ``README``).  They are verified (``H H^T = n I``) when
      loaded.
* Sizes with no construction (``7``, ``14``, ``6``, any ``n`` whose odd part
  has no base) raise :class:`HadamardError` from :func:`hadamard_factorization`,
  before anything large is allocated.
* Bases are cached (``functools.lru_cache``); full ``n x n`` matrices are not,
  they can be gigabytes and callers may modify them in place.
"""

from __future__ import annotations

import functools
import math
import operator
from importlib import resources

import numpy as np
import torch

__all__ = [
    "HadamardError",
    "hadamard_factorization",
    "has_hadamard",
    "hadamard_matrix",
    "random_hadamard_matrix",
    "fast_hadamard_transform",
    "hadamard_transform_T",
]

_DATA_FILE = "hadamard_bases.npz"


class HadamardError(ValueError):
    """No Hadamard matrix of the requested order can be built."""


# ----------------------------------------------------------------------------
# Base matrices (int8 numpy, entries +-1)
# ----------------------------------------------------------------------------


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    if q % 2 == 0:
        return q == 2
    return all(q % d for d in range(3, math.isqrt(q) + 1, 2))


def _jacobsthal(q: int) -> np.ndarray:
    """Q[i, j] = chi(j - i), chi the Legendre symbol mod the odd prime q."""
    chi = -np.ones(q, dtype=np.int8)
    chi[0] = 0
    chi[(np.arange(1, q, dtype=np.int64) ** 2) % q] = 1
    idx = (np.arange(q)[None, :] - np.arange(q)[:, None]) % q
    return chi[idx]


def _paley1(q: int) -> np.ndarray:
    """Order q + 1 for a prime q = 3 mod 4: H = I + [[0, 1^T], [-1, Q]]."""
    s = np.zeros((q + 1, q + 1), dtype=np.int8)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _jacobsthal(q)
    return s + np.eye(q + 1, dtype=np.int8)


def _paley2(q: int) -> np.ndarray:
    """Order 2 (q + 1) for a prime q = 1 mod 4.

    S = [[0, 1^T], [1, Q]] (symmetric); each 0 of S becomes [[1, -1], [-1, -1]]
    and each +-1 becomes +-[[1, 1], [1, -1]].
    """
    s = np.zeros((q + 1, q + 1), dtype=np.int8)
    s[0, 1:] = 1
    s[1:, 0] = 1
    s[1:, 1:] = _jacobsthal(q)
    zero_block = np.array([[1, -1], [-1, -1]], dtype=np.int8)
    sign_block = np.array([[1, 1], [1, -1]], dtype=np.int8)
    return np.kron(s, sign_block) + np.kron((s == 0).astype(np.int8), zero_block)


def _paley_kind(k: int) -> int:
    """1 or 2 if Paley I / II (prime q) builds order k, else 0."""
    if k % 4:
        return 0
    if _is_prime(k - 1) and (k - 1) % 4 == 3:
        return 1
    if _is_prime(k // 2 - 1) and (k // 2 - 1) % 4 == 1:
        return 2
    return 0


def _check_hadamard(h: np.ndarray, k: int, what: str) -> None:
    h64 = h.astype(np.int64)
    if h.shape != (k, k) or not np.array_equal(h64 @ h64.T, k * np.eye(k, dtype=np.int64)):
        raise HadamardError(f"{what}: not a Hadamard matrix of order {k} (H H^T != {k} I)")


@functools.lru_cache(maxsize=None)
def _data_file_bases() -> dict[int, np.ndarray]:
    """All bases of the data file, unpacked to int8 +-1 and verified."""
    path = resources.files("dartquant").joinpath("data", _DATA_FILE)
    out: dict[int, np.ndarray] = {}
    with path.open("rb") as f, np.load(f, allow_pickle=False) as z:
        for key in z.files:
            if not (key.startswith("h") and key[1:].isdigit()):
                continue  # README
            k = int(key[1:])
            bits = np.unpackbits(z[key], axis=1, count=k)
            h = np.where(bits == 1, 1, -1).astype(np.int8)
            _check_hadamard(h, k, f"{_DATA_FILE}[{key!r}]")
            h.setflags(write=False)
            out[k] = h
    return out


def _base_exists(k: int) -> bool:
    return k in (1, 2) or _paley_kind(k) > 0 or k in _data_file_bases()


@functools.lru_cache(maxsize=None)
def _base_matrix(k: int) -> np.ndarray:
    """Hadamard matrix of order k (entries +-1, int8, read-only)."""
    if k == 1:
        h = np.ones((1, 1), dtype=np.int8)
    elif k == 2:
        h = np.array([[1, 1], [1, -1]], dtype=np.int8)
    elif (kind := _paley_kind(k)) == 1:
        h = _paley1(k - 1)
    elif kind == 2:
        h = _paley2(k // 2 - 1)
    elif k in _data_file_bases():
        return _data_file_bases()[k]
    else:  # pragma: no cover - hadamard_factorization only returns buildable k
        raise HadamardError(f"no Hadamard base of order {k}")
    _check_hadamard(h, k, f"Paley construction of order {k}")
    h.setflags(write=False)
    return h


@functools.lru_cache(maxsize=64)
def _base_tensor(k: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(_base_matrix(k).astype(np.float64)).to(device=device, dtype=dtype)


def _sylvester(p: int, dtype: torch.dtype, device) -> torch.Tensor:
    h = torch.ones((1, 1), dtype=dtype, device=device)
    while h.shape[0] < p:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


# ----------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=1024)
def _factorization(n: int) -> tuple[int, int]:
    if n < 1:
        raise HadamardError(f"Hadamard matrix of order n={n} requested: n must be a positive integer")
    v = (n & -n).bit_length() - 1  # n = odd * 2**v
    odd = n >> v
    if odd == 1:
        return 1, n
    for j in range(2, v + 1):
        k = odd << j
        if _base_exists(k):
            return k, n // k
    if v < 2:
        why = ("n is not a multiple of 4, and a Hadamard matrix of order > 2 exists only for "
               "multiples of 4")
    else:
        tried = ", ".join(str(odd << j) for j in range(2, v + 1))
        why = (f"no known construction for any base order {odd}*2^j (2 <= j <= {v}) dividing n: "
               f"tried {tried}; known bases are Paley I/II for a prime q and the bundled orders "
               f"{sorted(_data_file_bases())}")
    raise HadamardError(
        f"no Hadamard matrix of order n={n} (= {odd} * 2^{v}, odd part {odd}): {why}. "
        f"Use a model dimension with a supported factorization (a power of two, or e.g. "
        f"12, 20, 28, 36, 52, 76, 108, 140, 172 times a power of two), or disable the online "
        f"Hadamard rotation that needs this size."
    )


def hadamard_factorization(n: int) -> tuple[int, int]:
    """Return ``(k, 2**m)`` with ``n == k * 2**m`` and the smallest buildable base ``k``.

    Raises :class:`HadamardError` if there is none.  Pure arithmetic (plus, once,
    reading the small data file), so it is a cheap up-front check.
    """
    if isinstance(n, bool):
        raise HadamardError(f"Hadamard order must be an integer, got {n!r}")
    try:
        n = operator.index(n)
    except TypeError:
        raise HadamardError(f"Hadamard order must be an integer, got {n!r}") from None
    return _factorization(n)


def has_hadamard(n: int) -> bool:
    """Whether :func:`hadamard_matrix` supports order ``n``."""
    try:
        hadamard_factorization(n)
    except HadamardError:
        return False
    return True


def _check_float(dtype: torch.dtype) -> None:
    if not dtype.is_floating_point:
        raise TypeError(f"Hadamard matrices need a floating dtype, got {dtype}")


def hadamard_matrix(n: int, dtype=torch.float64, device=None) -> torch.Tensor:
    """Orthonormal Hadamard matrix ``(H_k (x) H_{2**m}) / sqrt(n)`` of shape ``[n, n]``.

    ``(k, 2**m) = hadamard_factorization(n)``.  A new tensor on every call.
    """
    k, p = hadamard_factorization(n)
    _check_float(dtype)
    device = torch.device(device) if device is not None else torch.device("cpu")
    base = _base_tensor(k, dtype, device)
    h = torch.kron(base, _sylvester(p, dtype, device)) if k > 1 else _sylvester(p, dtype, device)
    return h.mul_(1.0 / math.sqrt(n))


def random_hadamard_matrix(n: int, seed: int, dtype=torch.float64, device=None) -> torch.Tensor:
    """QuaRot-style randomized Hadamard matrix ``diag(s) @ hadamard_matrix(n)``.

    ``s`` is a vector of random +-1 drawn on the CPU from a ``torch.Generator``
    seeded with ``seed`` (so the result does not depend on ``device``).  Orthogonal.
    """
    hadamard_factorization(n)  # fail fast
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    s = torch.randint(0, 2, (n,), generator=gen, dtype=torch.int64) * 2 - 1
    h = hadamard_matrix(n, dtype=dtype, device=device)
    return h.mul_(s.to(device=h.device, dtype=dtype)[:, None])


# Largest Sylvester block applied as one dense GEMM in the fast transform.
_MAX_RADIX = 64


def _radix_split(p: int) -> list[int]:
    """Split p = 2**m into near-equal powers of two, each <= _MAX_RADIX."""
    m = p.bit_length() - 1
    if m == 0:
        return []
    parts = -(-m // (_MAX_RADIX.bit_length() - 1))
    q, r = divmod(m, parts)
    return [1 << (q + (i < r)) for i in range(parts)]


@functools.lru_cache(maxsize=128)
def _kron_factors(n: int, dtype: torch.dtype, device: torch.device, transpose: bool):
    """Matrices M_1..M_t with H_n / sqrt(n) = M_1 (x) ... (x) M_t (transposed if asked).

    M_1 = H_k (if k > 1), then Sylvester blocks of size <= _MAX_RADIX.  The last
    one (applied first) carries the 1/sqrt(n) scale, which saves a pass over x.
    """
    k, p = hadamard_factorization(n)
    mats = [_base_tensor(k, dtype, device)] if k > 1 else []
    mats += [_sylvester(r, dtype, device) for r in _radix_split(p)]
    if transpose:
        mats = [m.T.contiguous() for m in mats]  # Sylvester blocks are symmetric anyway
    if mats:
        mats[-1] = mats[-1] * (1.0 / math.sqrt(n))
    return tuple(mats)


def _transform(x: torch.Tensor, transpose: bool) -> torch.Tensor:
    if not x.dtype.is_floating_point:
        raise TypeError(f"fast_hadamard_transform needs a floating tensor, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("fast_hadamard_transform needs at least one dimension")
    n = x.shape[-1]
    hadamard_factorization(n)  # fail fast with a clear message
    out_dtype = x.dtype
    # Half precision: accumulate in float32 (like a half GEMM does), cast back at the end.
    work = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    lead = x.shape[:-1]
    rows = math.prod(lead)
    y = x.to(work).reshape(rows, n)
    mats = _kron_factors(n, work, x.device, transpose)
    # x @ (M_1 (x) ... (x) M_t): view x as [rows, f_1, ..., f_t] (row-major, the Kronecker
    # index order), contract the last axis with M_t by one GEMM, then rotate that axis to
    # the front; after t steps every axis has been contracted and is back in place.
    # With M = Sylvester blocks this is a radix-f Walsh-Hadamard butterfly.
    for m in reversed(mats):
        f = m.shape[0]
        y = (y.reshape(-1, f) @ m).reshape(rows, n // f, f).transpose(1, 2)
    if not mats:  # n == 1
        y = y.clone()
    return y.reshape(*lead, n).to(out_dtype)


def fast_hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """``x @ hadamard_matrix(x.shape[-1])`` in ``O(n log n + n k)``.

    The power-of-two factor is a Walsh-Hadamard butterfly of radix <= 64 (each
    stage a small dense GEMM with a Sylvester block, a few times faster on CPU
    than radix 2), the base ``H_k`` one ``[*, k] x [k, k]`` GEMM.

    Any leading dimensions; same dtype and device as ``x``; differentiable.
    float16 / bfloat16 inputs are computed in float32 and rounded once at the end.
    """
    return _transform(x, transpose=False)


def hadamard_transform_T(x: torch.Tensor) -> torch.Tensor:
    """``x @ hadamard_matrix(x.shape[-1]).T``: the inverse of :func:`fast_hadamard_transform`."""
    return _transform(x, transpose=True)
