"""The exact QR-route SVD of low-rank products, dense SVDs, and the rank rules."""

from __future__ import annotations

import pytest
import torch

from loralib.compose.lowrank import (
    balance,
    concatenate,
    dense_svd,
    frobenius_inner,
    gram,
    norm_ratio,
    product_svd,
    relative_distance,
)
from loralib.compose.rank_rules import RankRule, parse_dynamic, rank_rule
from loralib.errors import InvalidArgumentError
from tests.helpers.compose_cases import optimal_error


def _factors(m: int, n: int, r: int, seed: int, dtype=torch.float64, decay: float = 0.85):
    g = torch.Generator().manual_seed(seed)
    spectrum = decay ** torch.arange(r, dtype=dtype)
    return torch.randn(m, r, generator=g, dtype=dtype) * spectrum, torch.randn(r, n, generator=g, dtype=dtype)


@pytest.mark.parametrize("m,n,r", [(7, 5, 3), (40, 30, 12), (5, 40, 12), (1280, 320, 48), (2000, 160, 64)])
def test_product_svd_matches_dense_svd(m, n, r):
    up, down = _factors(m, n, r, seed=m + n)
    matrix = up @ down
    spectrum = product_svd(up, down)
    dense_s = torch.linalg.svdvals(matrix)
    q = spectrum.size
    assert q == min(m, n, r)
    assert torch.allclose(spectrum.singular_values, dense_s[:q], rtol=1e-7, atol=1e-8 * float(dense_s[0]))
    full_up, full_down = spectrum.factors(q)
    assert float((full_up @ full_down - matrix).norm() / matrix.norm()) < 1e-10


@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
@pytest.mark.parametrize("k", [1, 5, 17])
def test_truncation_is_the_eckart_young_optimum(dtype, tolerance, k):
    up, down = _factors(360, 280, 32, seed=k, dtype=dtype)
    matrix = up.double() @ down.double()
    spectrum = product_svd(up, down)
    new_up, new_down = spectrum.factors(k)
    error = float((new_up.double() @ new_down.double() - matrix).norm())
    best = optimal_error(matrix, k)
    assert abs(error - best) <= tolerance * best
    assert spectrum.error(k) == pytest.approx(best / float(matrix.norm()), rel=1e-6)
    assert spectrum.retained(k) == pytest.approx(float((new_up.double() @ new_down.double()).norm() / matrix.norm()),
                                                 rel=1e-6)
    # balanced factors: both carry √σ, so their norms agree
    assert float(new_up.norm()) == pytest.approx(float(new_down.norm()), rel=1e-6)


@pytest.mark.parametrize("condition", [1e2, 1e6, "rank-deficient", "uneven scales", "zero components"])
def test_ill_conditioned_factors_stay_exact(condition):
    # Gram matrices of float32 factors lose digits when a factor is ill-conditioned; those take the QR route.
    # (Uneven column scales alone are not ill-conditioning here: columns are normalised first.)
    g = torch.Generator().manual_seed(7)
    basis, _ = torch.linalg.qr(torch.randn(500, 48, generator=g, dtype=torch.float64))
    mix, _ = torch.linalg.qr(torch.randn(48, 48, generator=g, dtype=torch.float64))
    if condition == "rank-deficient":
        up = ((basis * torch.cat([torch.ones(24), torch.zeros(24)]).double()) @ mix).float()
    elif condition == "uneven scales":  # condition number 2e7, all of it in the column norms
        up = (torch.randn(500, 48, generator=g, dtype=torch.float64) * 0.7 ** torch.arange(48.0)).float()
    elif condition == "zero components":  # what fp16 storage makes of tiny ones: they contribute nothing
        up = (torch.randn(500, 48, generator=g, dtype=torch.float64) * (torch.arange(48) < 40)).float()
    else:
        scales = torch.logspace(0, -torch.log10(torch.tensor(condition)).item(), 48, dtype=torch.float64)
        up = ((basis * scales) @ mix).float()
    down = (torch.randn(48, 400, generator=g, dtype=torch.float64) * 0.95 ** torch.arange(48.0)[:, None]).float()
    assert product_svd(up, down).method == ("qr" if condition in (1e6, "rank-deficient") else "cholesky")
    matrix = up.double() @ down.double()
    for k in (4, 16):
        new_up, new_down = product_svd(up, down).factors(k)
        error = float((new_up.double() @ new_down.double() - matrix).norm())
        assert abs(error - optimal_error(matrix, k)) <= 1e-4 * optimal_error(matrix, k), k


@pytest.mark.parametrize("blas_threads", ["1", "4"])
def test_gram_matrices_equal_the_plain_products_whichever_blas_computes_them(monkeypatch, blas_threads):
    # With OPENBLAS_NUM_THREADS=1 (the CLI's setting) numpy's symmetric product computes them, else torch.
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", blas_threads)
    for dtype in (torch.float32, torch.float64):
        up, down = _factors(1280, 640, 48, seed=11, dtype=dtype)
        columns, rows = gram(up), gram(down, rows=True)
        assert columns.dtype == rows.dtype == dtype and columns.shape == rows.shape == (48, 48)
        tolerance = 1e-6 if dtype == torch.float32 else 1e-14
        for found, expected in ((columns, up.double().T @ up.double()), (rows, down.double() @ down.double().T)):
            assert float((found.double() - expected).norm()) <= tolerance * float(expected.norm())
        assert torch.equal(columns, columns.T) and torch.equal(rows, rows.T)
    assert torch.allclose(gram(up.T.contiguous().T), gram(up), rtol=1e-12)  # a non-contiguous view


def test_a_truncation_computes_the_kept_singular_vectors_only_and_they_are_the_full_ones():
    up, down = _factors(300, 200, 40, seed=12)
    spectrum = product_svd(up, down)
    assert spectrum.method == "cholesky" and spectrum.core_u is None  # nothing mapped back yet
    first_u, first_vh = spectrum.cores(6)
    assert first_u.shape == (40, 6) and first_vh.shape == (6, 40) and spectrum.core_u is None
    all_u, all_vh = spectrum.cores(spectrum.size)
    assert spectrum.core_u is not None  # the full cores are kept once computed
    assert torch.allclose(first_u, all_u[:, :6], rtol=1e-12, atol=1e-14)
    assert torch.allclose(first_vh, all_vh[:6], rtol=1e-12, atol=1e-14)


def test_concatenation_and_balance_are_exact():
    a_up, a_down = _factors(30, 20, 4, seed=1)
    b_up, b_down = _factors(30, 20, 6, seed=2)
    up, down = concatenate([(a_up, a_down, 0.7), (b_up, b_down, -0.3)])
    expected = 0.7 * a_up @ a_down - 0.3 * b_up @ b_down
    assert up.shape == (30, 10) and down.shape == (10, 20)
    assert torch.allclose(up @ down, expected, atol=1e-12)
    bu, bd = balance(a_up, a_down, -1e-4)
    assert torch.allclose(bu @ bd, -1e-4 * a_up @ a_down, atol=1e-15)
    assert float(bu.norm()) == pytest.approx(float(bd.norm()))


def test_gram_identities_match_dense():
    a_up, a_down = _factors(50, 40, 5, seed=3)
    b_up, b_down = _factors(50, 40, 7, seed=4)
    a, b = a_up @ a_down, b_up @ b_down
    assert frobenius_inner(a_up, a_down, b_up, b_down) == pytest.approx(float((a * b).sum()), rel=1e-10)
    assert relative_distance(a_up, a_down, b_up, b_down) == pytest.approx(float((a - b).norm() / b.norm()), rel=1e-8)
    assert norm_ratio(a_up, a_down, b_up, b_down) == pytest.approx(float(a.norm() / b.norm()), rel=1e-10)


def test_large_product_is_never_formed_densely():
    # A dense 60000 x 50000 delta would need 12 GB; the QR route needs a few megabytes.
    up, down = _factors(60_000, 50_000, 6, seed=5, dtype=torch.float32)
    spectrum = product_svd(up, down)
    new_up, new_down = spectrum.factors(3)
    assert new_up.shape == (60_000, 3) and new_down.shape == (3, 50_000)
    assert 0 < spectrum.retained(3) < 1


def test_dense_svd_exact_and_randomized():
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(400, 120, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(300, 120, generator=g, dtype=torch.float64))
    s = 0.7 ** torch.arange(120, dtype=torch.float64)
    matrix = (u * s) @ v.T
    for method in ("exact", "randomized"):
        spectrum = dense_svd(matrix, 8, method=method)
        up, down = spectrum.factors(8)
        error = float((up @ down - matrix).norm())
        assert error == pytest.approx(optimal_error(matrix, 8), rel=1e-6), method
        assert spectrum.error(8) == pytest.approx(error / float(matrix.norm()), rel=1e-6)
    # a matrix of rank 5 is recovered exactly by the randomized method
    low = matrix @ v[:, :5] @ v[:, :5].T
    up, down = dense_svd(low, 5, method="randomized").factors(5)
    assert float((up @ down - low).norm() / low.norm()) < 1e-10
    assert dense_svd(matrix, 8, method="auto").method == "randomized"  # where the rank is small
    assert dense_svd(matrix[:30, :30], 8, method="auto").method == "exact"  # where it is not


SPECTRUM = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.5], dtype=torch.float64)


@pytest.mark.parametrize("rule,expected", [
    ("sv_ratio:4", 2),         # keep σ ≥ 2.5
    ("sv_ratio:5", 3),         # σ ≥ 2 keeps the 2 itself
    ("sv_ratio:1", 1),
    ("sv_fro:0.9", 2),         # energies 100, 125, 129, 130, 130.25: √(125/130.25) = 0.9797 ≥ 0.9
    ("sv_fro:0.98", 3),        # 0.9797 < 0.98 ≤ √(129/130.25) = 0.9952
    ("sv_fro:1.0", 5),
    ("sv_cumulative:0.8", 2),  # sums 10, 15, 17, 18, 18.5 of 18.5: 15/18.5 = 0.81
    ("sv_cumulative:0.95", 4),  # 17/18.5 = 0.919 < 0.95 ≤ 18/18.5 = 0.973
])
def test_dynamic_rules_on_a_known_spectrum(rule, expected):
    assert rank_rule(dynamic=rule).choose(SPECTRUM) == expected
    assert rank_rule(dynamic=rule, max_rank=2).choose(SPECTRUM) == min(expected, 2)


def test_fixed_rule_and_argument_errors():
    assert rank_rule(rank=3).choose(SPECTRUM) == 3
    assert rank_rule(rank=30).choose(SPECTRUM) == 5
    assert rank_rule() is None
    assert rank_rule(max_rank=4) == RankRule("fixed", 4)
    assert parse_dynamic("SV_FRO:0.5") == ("sv_fro", 0.5)
    for kwargs in ({"rank": 0}, {"rank": 4, "dynamic": "sv_fro:0.9"}, {"dynamic": "sv_fro:1.5"},
                   {"dynamic": "sv_ratio:0.5"}, {"dynamic": "fro:0.9"}, {"dynamic": "sv_fro:x"},
                   {"dynamic": "sv_fro"}, {"dynamic": "sv_fro:0.9", "max_rank": 0}):
        with pytest.raises(InvalidArgumentError):
            rank_rule(**kwargs)


def test_map_modules_on_several_threads_gives_the_sequential_results_in_order():
    """The suite runs torch single-threaded, so the thread pool is exercised here explicitly."""
    import torch

    from loralib.compose.parallel import map_modules

    matrices = [torch.randn(64, 8, generator=torch.Generator().manual_seed(i)) for i in range(9)]
    seen = []
    parallel = map_modules(lambda m: torch.linalg.svdvals(m), matrices, lambda done, total: seen.append((done, total)),
                           workers=3)
    for result, matrix in zip(parallel, matrices):
        assert torch.equal(result, torch.linalg.svdvals(matrix))
    assert seen[-1] == (9, 9) and [d for d, _ in seen] == sorted(d for d, _ in seen)
