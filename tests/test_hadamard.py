"""Tests for dartquant.hadamard (orthonormal Hadamard matrices and the fast transform)."""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch

from dartquant.hadamard import (
    HadamardError,
    fast_hadamard_transform,
    hadamard_factorization,
    hadamard_matrix,
    hadamard_transform_T,
    has_hadamard,
    random_hadamard_matrix,
)

# Sizes of real models, and small sizes of tiny test models.
MODEL_SIZES = [64, 128, 576, 896, 1536, 2048, 3072, 3584, 4096, 4864, 5120,
               8192, 8960, 11008, 13824, 14336, 18944, 27648]
TINY_SIZES = [12, 20, 24, 28, 36, 40, 48, 52, 56, 60, 72, 80, 96, 100, 160, 172]
DENSE_LIMIT = 4096  # above this a dense float64 H @ H.T takes too long for the fast suite
DENSE_SIZES = [n for n in TINY_SIZES + MODEL_SIZES if n <= DENSE_LIMIT]
LARGE_SIZES = [n for n in MODEL_SIZES if n > DENSE_LIMIT]
DATA_FILE_ORDERS = [52, 92, 100, 116, 156, 172, 188, 236, 244, 428]
UNSUPPORTED = [3, 5, 6, 7, 10, 14, 18, 22, 26, 30, 668, 668 * 2]

EXPECTED_FACTORIZATION = {
    64: (1, 64), 2048: (1, 2048), 12: (12, 1), 24: (12, 2), 20: (20, 1), 28: (28, 1),
    36: (36, 1), 52: (52, 1), 60: (60, 1), 100: (100, 1), 172: (172, 1),
    576: (36, 16), 896: (28, 32), 1536: (12, 128), 3072: (12, 256), 3584: (28, 128),
    4864: (76, 64), 5120: (20, 256), 8960: (140, 64), 11008: (172, 64),
    13824: (108, 128), 14336: (28, 512), 18944: (148, 128), 27648: (108, 256),
}


def _max_offdiag_error(g: torch.Tensor) -> float:
    eye = torch.eye(g.shape[0], dtype=g.dtype)
    return (g - eye).abs().max().item()


def _sylvester_row(b: int, p: int) -> np.ndarray:
    """Row b of the unnormalized Sylvester matrix: (-1)^popcount(a & b), independent of the module."""
    a = np.arange(p)
    return np.where(np.array([bin(int(v)).count("1") % 2 for v in (a & b)]) == 1, -1.0, 1.0)


def _reference_rows(n: int, idx: list[int]) -> torch.Tensor:
    """Rows idx of (H_k (x) H_p) / sqrt(n), built from the definition (base from hadamard_matrix(k))."""
    k, p = hadamard_factorization(n)
    base = torch.round(hadamard_matrix(k) * math.sqrt(k)).numpy()
    rows = [np.kron(base[i // p], _sylvester_row(i % p, p)) for i in idx]
    return torch.tensor(np.stack(rows)) / math.sqrt(n)


def _sample_rows(n: int, count: int = 24, seed: int = 0) -> list[int]:
    k, p = hadamard_factorization(n)
    rng = np.random.default_rng(seed)
    fixed = {0, 1, n - 1, p - 1, p, n - p, n // 2}  # block boundaries of the Kronecker layout
    return sorted(i for i in fixed | set(rng.integers(0, n, count).tolist()) if 0 <= i < n)


# ---------------------------------------------------------------------------
# Factorization and errors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("n, expected", sorted(EXPECTED_FACTORIZATION.items()))
def test_factorization_expected(n, expected):
    assert hadamard_factorization(n) == expected
    assert has_hadamard(n)


def test_factorization_is_smallest_usable_base():
    supported = 0
    for n in range(1, 8200):
        if not has_hadamard(n):
            continue
        supported += 1
        k, p = hadamard_factorization(n)
        assert k * p == n and p & (p - 1) == 0, n
        assert k in (1, 2) or k % 4 == 0, n
        # Every smaller candidate base (odd part * 2^j, j >= 2, n / k' a power of two)
        # must be unsupported, or the factorization was not the smallest.
        odd = n // (n & -n)
        for j in range(2, 20):
            kk = odd << j
            if kk < k and n % kk == 0:
                assert not has_hadamard(kk), (n, k, kk)
    assert supported > 1200  # most multiples of 4 below 8200 are (1273 of 2050)


@pytest.mark.parametrize("n", UNSUPPORTED)
def test_unsupported_sizes_raise(n):
    assert not has_hadamard(n)
    with pytest.raises(HadamardError, match=rf"n={n}\b") as info:
        hadamard_factorization(n)
    assert isinstance(info.value, ValueError)
    msg = str(info.value)
    assert f"odd part {n // (n & -n)}" in msg
    assert "disable" in msg  # tells the user what to do
    with pytest.raises(HadamardError, match=str(n)):
        hadamard_matrix(n)
    with pytest.raises(HadamardError, match=str(n)):
        random_hadamard_matrix(n, seed=0)
    with pytest.raises(HadamardError, match=str(n)):
        fast_hadamard_transform(torch.zeros(2, n))


def test_unsupported_fails_fast_without_allocating():
    n = 2 * (10**9 + 7)  # would be ~3e19 bytes if built
    with pytest.raises(HadamardError, match=str(n)):
        hadamard_matrix(n)


@pytest.mark.parametrize("bad", [0, -4, 2.5, True, "64"])
def test_bad_orders_raise(bad):
    with pytest.raises(HadamardError):
        hadamard_factorization(bad)
    assert not has_hadamard(bad)


def test_numpy_integer_order():
    assert hadamard_factorization(np.int64(896)) == (28, 32)


# ---------------------------------------------------------------------------
# Orthogonality and entries
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", DENSE_SIZES)
def test_orthogonal_dense(n):
    h = hadamard_matrix(n)
    assert h.shape == (n, n) and h.dtype == torch.float64
    assert torch.all(h.abs() == 1.0 / math.sqrt(n))
    assert _max_offdiag_error(h @ h.T) < 1e-12


@pytest.mark.parametrize("n", LARGE_SIZES)
def test_orthogonal_large_sampled_rows(n):
    """Rows idx of H (via the fast transform) match the Kronecker definition, and rows idx of H H^T are e_idx."""
    idx = _sample_rows(n)
    e = torch.zeros(len(idx), n, dtype=torch.float64)
    e[torch.arange(len(idx)), torch.tensor(idx)] = 1.0
    rows = fast_hadamard_transform(e)  # = H[idx]
    torch.testing.assert_close(rows, _reference_rows(n, idx), rtol=0, atol=1e-15)
    assert _max_offdiag_error(rows @ rows.T) < 1e-12
    assert (hadamard_transform_T(rows) - e).abs().max().item() < 1e-12  # (H H^T)[idx] = I[idx]


@pytest.mark.slow
@pytest.mark.parametrize("n", LARGE_SIZES)
def test_orthogonal_large_full(n, request):
    """All of H H^T = I, in row blocks, via the fast transform (dense n^3 is too slow).

    Minutes on 2 cores: runs only when asked for with ``-m slow``.
    """
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("slow (minutes); run with -m slow")
    step = 1024
    for start in range(0, n, step):
        e = torch.zeros(min(step, n - start), n, dtype=torch.float64)
        e[:, start : start + step].fill_diagonal_(1.0)
        err = (hadamard_transform_T(fast_hadamard_transform(e)) - e).abs().max().item()
        assert err < 1e-12, (n, start, err)


@pytest.mark.parametrize("n", [12, 24, 28, 52, 576, 896, 1536])
def test_dense_matrix_is_kronecker_of_base_and_sylvester(n):
    h = hadamard_matrix(n)
    torch.testing.assert_close(h, _reference_rows(n, list(range(n))), rtol=0, atol=0)


def test_paley_bases_are_hadamard_and_not_all_symmetric():
    h12 = hadamard_matrix(12)  # Paley I (q = 11): skew-type, not symmetric
    h28 = hadamard_matrix(28)  # Paley II (q = 13)
    assert not torch.equal(h12, h12.T)
    for h in (h12, h28):
        assert _max_offdiag_error(h @ h.T) < 1e-14


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matrix_dtype(dtype):
    h = hadamard_matrix(896, dtype=dtype)
    assert h.dtype == dtype
    torch.testing.assert_close(h.double(), hadamard_matrix(896), rtol=0, atol=1e-2 / math.sqrt(896))


def test_matrix_rejects_integer_dtype():
    with pytest.raises(TypeError):
        hadamard_matrix(64, dtype=torch.int32)


def test_matrix_is_fresh_each_call():
    a = hadamard_matrix(12)
    a.zero_()
    assert hadamard_matrix(12).abs().min().item() > 0


# ---------------------------------------------------------------------------
# Data file
# ---------------------------------------------------------------------------


def test_data_file_bases():
    path = resources.files("dartquant").joinpath("data", "hadamard_bases.npz")
    with path.open("rb") as f, np.load(f, allow_pickle=False) as z:
        keys = set(z.files)
        assert keys == {"README"} | {f"h{k}" for k in DATA_FILE_ORDERS}
        readme = str(z["README"])
        assert "MIT License" in readme and "exllamav2" in readme
        for k in DATA_FILE_ORDERS:
            packed = z[f"h{k}"]
            assert packed.dtype == np.uint8 and packed.shape == (k, (k + 7) // 8)
            h = np.where(np.unpackbits(packed, axis=1, count=k) == 1, 1, -1).astype(np.int64)
            np.testing.assert_array_equal(h @ h.T, k * np.eye(k, dtype=np.int64))
            # The library uses the stored matrix as the base, unchanged.
            assert hadamard_factorization(k) == (k, 1)
            np.testing.assert_array_equal(np.rint(hadamard_matrix(k).numpy() * math.sqrt(k)), h)


def test_data_file_matches_exllamav2_text_if_available():
    src = Path("/tmp/venv/lib/python3.11/site-packages/exllamav2/hadamard")
    if not src.is_dir():
        pytest.skip("exllamav2 text files not present")
    for k in DATA_FILE_ORDERS:
        rows = [r.strip() for r in (src / f"hadamard_{k}.txt").read_text().splitlines() if r.strip()]
        text = np.array([[1 if c == "+" else -1 for c in r] for r in rows], dtype=np.float64)
        np.testing.assert_array_equal(np.rint(hadamard_matrix(k).numpy() * math.sqrt(k)), text)


def test_non_hadamard_base_is_rejected():
    from dartquant.hadamard import _check_hadamard

    h = np.ones((4, 4), dtype=np.int8)
    with pytest.raises(HadamardError, match="order 4"):
        _check_hadamard(h, 4, "test")


# ---------------------------------------------------------------------------
# Fast transform
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 4, 12, 24, 28, 52, 100, 172, 576, 896, 1536, 4864])
@pytest.mark.parametrize("lead", [(), (3,), (2, 5), (2, 1, 3)])
def test_fast_transform_equals_dense_float64(n, lead):
    gen = torch.Generator().manual_seed(n + len(lead))
    x = torch.randn(*lead, n, generator=gen, dtype=torch.float64)
    h = hadamard_matrix(n)
    y = fast_hadamard_transform(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert (y - x @ h).abs().max().item() < 1e-10
    yt = hadamard_transform_T(x)
    assert (yt - x @ h.T).abs().max().item() < 1e-10
    assert (hadamard_transform_T(y) - x).abs().max().item() < 1e-10


def test_fast_transform_is_not_transposed():
    """With a non-symmetric base, x @ H and x @ H^T differ; the transform must give the former."""
    x = torch.randn(4, 24, dtype=torch.float64)
    h = hadamard_matrix(24)
    assert (x @ h - x @ h.T).abs().max().item() > 1e-3
    torch.testing.assert_close(fast_hadamard_transform(x), x @ h, rtol=0, atol=1e-12)


def test_fast_transform_noncontiguous_and_empty():
    x = torch.randn(896, 5, dtype=torch.float64).T  # non-contiguous
    torch.testing.assert_close(fast_hadamard_transform(x), x @ hadamard_matrix(896), rtol=0, atol=1e-10)
    assert fast_hadamard_transform(torch.zeros(0, 3, 28)).shape == (0, 3, 28)


@pytest.mark.parametrize("n", [576, 896, 4864])
def test_fast_transform_float32(n):
    x = torch.randn(3, n, dtype=torch.float64)
    ref = x @ hadamard_matrix(n)
    y = fast_hadamard_transform(x.float())
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_fast_transform_half(dtype, tol):
    x = torch.randn(3, 896).to(dtype)
    ref = x.double() @ hadamard_matrix(896)
    y = fast_hadamard_transform(x)
    assert y.dtype == dtype
    assert ((y.double() - ref).abs() <= tol * ref.abs() + 1e-3).all()


def test_fast_transform_rejects_integer_input():
    with pytest.raises(TypeError):
        fast_hadamard_transform(torch.ones(4, 12, dtype=torch.int64))


@pytest.mark.parametrize("n", [12, 24])
def test_gradcheck(n):
    x = torch.randn(2, n, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fast_hadamard_transform, (x,))
    assert torch.autograd.gradcheck(hadamard_transform_T, (x,))


@pytest.mark.parametrize("n", [32, 56, 128, 896])
def test_gradcheck_fast_mode(n):
    x = torch.randn(2, 3, n, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fast_hadamard_transform, (x,), fast_mode=True)
    assert torch.autograd.gradcheck(hadamard_transform_T, (x,), fast_mode=True)


def test_gradient_matches_dense():
    n = 576
    x = torch.randn(4, n, dtype=torch.float64, requires_grad=True)
    g = torch.randn(4, n, dtype=torch.float64)
    (fast_hadamard_transform(x) * g).sum().backward()
    torch.testing.assert_close(x.grad, g @ hadamard_matrix(n).T, rtol=0, atol=1e-10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_cuda_matches_cpu(dtype):
    x = torch.randn(2, 3, 4864, dtype=torch.float64)
    y = fast_hadamard_transform(x.to("cuda", dtype))
    assert y.device.type == "cuda" and y.dtype == dtype
    tol = {torch.float64: 1e-10, torch.float32: 1e-4}.get(dtype, 5e-2)
    torch.testing.assert_close(y.double().cpu(), x.to(dtype).double() @ hadamard_matrix(4864), rtol=tol, atol=tol)
    h = hadamard_matrix(4864, dtype=dtype, device="cuda")
    assert h.device.type == "cuda" and h.dtype == dtype


# ---------------------------------------------------------------------------
# Random Hadamard
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", [28, 896])
def test_random_hadamard(n):
    torch.manual_seed(123)
    a = random_hadamard_matrix(n, seed=7)
    torch.manual_seed(456)  # the global RNG must not matter
    b = random_hadamard_matrix(n, seed=7)
    c = random_hadamard_matrix(n, seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert _max_offdiag_error(a @ a.T) < 1e-12
    # a = diag(s) @ H with s in {-1, +1}, not all equal.
    s = (a / hadamard_matrix(n))
    assert torch.all(s == s[:, :1])
    s = s[:, 0]
    assert torch.all(s.abs() == 1) and (s > 0).any() and (s < 0).any()


def test_random_hadamard_dtype():
    a = random_hadamard_matrix(64, seed=0, dtype=torch.float32)
    assert a.dtype == torch.float32 and a.shape == (64, 64)
    torch.testing.assert_close(a.double(), random_hadamard_matrix(64, seed=0), rtol=0, atol=1e-7)
