"""Exact SVD of low-rank products without forming the dense matrix, and of dense matrices.

A LoRA delta is ``up @ down`` with ``up: [m, R]`` and ``down: [R, n]``. With thin QR factorisations
``up = Q_u R_u`` and ``downᵀ = Q_d R_d`` the product is ``Q_u (R_u R_dᵀ) Q_dᵀ``; the SVD of the small
core ``R_u R_dᵀ`` gives the exact singular values and vectors of ``up @ down`` in ``O((m + n) R²)``
instead of the ``O(m n min(m, n))`` of a dense SVD. A merge of several adapters is the same
computation on their concatenated factors. Dense deltas (TIES, DARE, extraction) use an exact SVD
or a randomized one with power iterations, chosen by the requested rank.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..vocabulary import SVD_METHODS


def work_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64, else float32 (fp16/bf16 are never computed in)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


@dataclass
class Spectrum:
    """A thin SVD ``U diag(S) Vh``, with ``U`` and ``Vh`` possibly kept as basis times small core.

    ``U = left @ core_u`` and ``Vh = core_vh @ rightᵀ``; ``left``/``right`` are None when
    ``core_u``/``core_vh`` already are the full singular vectors. Keeping them apart means
    truncating to rank ``k`` costs one ``[m, p] @ [p, k]`` product per side. A route may leave
    the cores None and give ``leading`` instead, which computes the first ``k`` of them (see
    :meth:`cores`): a truncation then pays only for the vectors it keeps.
    """

    core_u: torch.Tensor | None
    singular_values: torch.Tensor  # descending, float64
    core_vh: torch.Tensor | None
    left: torch.Tensor | None = None
    right: torch.Tensor | None = None
    total_energy: float | None = None  # ‖M‖_F² when the spectrum is only the top part (randomized)
    method: str = ""  # how it was computed: cholesky, qr, exact or randomized
    leading: Callable[[int], tuple[torch.Tensor, torch.Tensor]] | None = field(default=None, repr=False)

    def cores(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``k`` columns of ``core_u`` and rows of ``core_vh``."""
        if self.core_u is None or self.core_vh is None:
            if k < self.size:
                return self.leading(k)
            self.core_u, self.core_vh = self.leading(self.size)
        return self.core_u[:, :k], self.core_vh[:k]

    @property
    def size(self) -> int:
        """How many singular values are known."""
        return int(self.singular_values.numel())

    @property
    def energy(self) -> float:
        """``‖M‖_F²``: the sum of all squared singular values."""
        if self.total_energy is not None:
            return self.total_energy
        return float(self.singular_values.pow(2).sum())

    def retained(self, k: int) -> float:
        """``‖M_k‖_F / ‖M‖_F`` for the best rank-``k`` approximation (1.0 for a zero matrix)."""
        total = self.energy
        if total <= 0:
            return 1.0
        kept = float(self.singular_values[:k].pow(2).sum())
        return min(1.0, (kept / total) ** 0.5)

    def error(self, k: int) -> float:
        """``‖M − M_k‖_F / ‖M‖_F``, the relative error of the best rank-``k`` approximation."""
        total = self.energy
        if total <= 0:
            return 0.0
        kept = float(self.singular_values[:k].pow(2).sum())
        return max(0.0, (total - kept) / total) ** 0.5

    def factors(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Balanced rank-``k`` factors ``(up [m, k], down [k, n])`` with ``up @ down = M_k``.

        Each factor carries ``√σ``, so both have the same scale (good for fp16 storage).
        """
        k = max(0, min(k, self.size))
        core_u, core_vh = self.cores(k)
        root = self.singular_values[:k].sqrt().to(core_u.dtype)
        up = core_u * root
        down = root[:, None] * core_vh
        if self.left is not None:
            up = self.left @ up.to(self.left.dtype)
        if self.right is not None:
            down = down.to(self.right.dtype) @ self.right.T
        return up, down


def product_svd(up: torch.Tensor, down: torch.Tensor, scale: torch.Tensor | None = None) -> Spectrum:
    """The exact thin SVD of ``up @ diag(scale) @ down`` (``up: [m, R]``, ``down: [R, n]``, ``scale: [R]``,
    default ones) without forming the ``m × n`` product.

    Well-conditioned factors take the Cholesky route: two ``R × R`` Gram matrices (BLAS-3 only),
    normalised by the columns' norms so that uneven rank components are not mistaken for
    ill-conditioning. Ill-conditioned or rank-deficient factors take the Householder QR route,
    which is stable for any input.
    """
    dtype = work_dtype(up, down)
    up, down = up.to(dtype), down.to(dtype)
    scale = (torch.ones(up.shape[1], dtype=torch.float64, device=up.device) if scale is None
             else scale.to(up.device, torch.float64))
    return _cholesky_svd(up, down, scale) or _qr_svd(up * scale.to(dtype), down)


# The Cholesky route is used while every pivot of both normalised Gram factors is at least this
# fraction of the largest (a condition number up to about 10³); float32 Gram matrices lose
# digits that matter beyond it.
PIVOT_MIN = 1e-3


def gram(matrix: torch.Tensor, *, rows: bool = False) -> torch.Tensor:
    """``matrixᵀ @ matrix`` (with ``rows``, ``matrix @ matrixᵀ``), with half the multiplications where that is safe.

    The Gram matrices are most of a resize's or merge's arithmetic. torch has only the general
    product; numpy hands a matrix times its own transpose to BLAS' symmetric routine (``syrk``),
    which computes one triangle: 1.4-3× faster here for LoRA shapes. numpy's BLAS is used only
    when it runs one thread per call (``OPENBLAS_NUM_THREADS=1``, which the ``lorareg`` command
    sets before numpy loads; OpenBLAS reads it only then): modules are computed side by side
    already, and a second BLAS thread per call only competes with them for the cores.
    """
    if matrix.device.type != "cpu" or matrix.dtype not in (torch.float32, torch.float64) or matrix.requires_grad \
            or os.environ.get("OPENBLAS_NUM_THREADS") != "1":
        return matrix @ matrix.T if rows else matrix.T @ matrix
    array = matrix.contiguous().numpy()
    return torch.from_numpy(array @ array.T if rows else array.T @ array)


def _qr_svd(up: torch.Tensor, down: torch.Tensor) -> Spectrum:
    """``up = Q_u R_u``, ``downᵀ = Q_d R_d``; the SVD of the core ``R_u R_dᵀ`` is that of ``up @ down``."""
    q_up, r_up = torch.linalg.qr(up)
    q_down, r_down = torch.linalg.qr(down.T)
    core_u, s, core_vh = torch.linalg.svd((r_up @ r_down.T).double(), full_matrices=False)
    return Spectrum(core_u.to(up.dtype), s, core_vh.to(up.dtype), left=q_up, right=q_down, method="qr")


def _cholesky_factor(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(L, norms)`` with ``gram = D L Lᵀ D``, ``D = diag(norms)``; None if ill-conditioned."""
    norms = gram.diagonal().sqrt()
    chol, bad = torch.linalg.cholesky_ex(gram / norms[:, None] / norms[None, :])
    if int(bad):
        return None
    pivots = chol.diagonal()
    if float(pivots.min()) < PIVOT_MIN * float(pivots.max()):
        return None
    return chol, norms


def _cholesky_svd(up: torch.Tensor, down: torch.Tensor, scale: torch.Tensor) -> Spectrum | None:
    """The SVD of ``up @ diag(scale) @ down`` from Cholesky factors of the two Gram matrices.

    With ``upᵀup = D_u L_u L_uᵀ D_u`` and ``down downᵀ = D_d L_d L_dᵀ D_d`` (``D`` the norms of
    ``up``'s columns and ``down``'s rows), ``up = Q_u L_uᵀ D_u`` and ``down = D_d L_d Q_dᵀ`` with
    orthonormal ``Q``: the product has the singular values of the core
    ``C = L_uᵀ D_u diag(scale) D_d L_d``, and its singular vectors map back through triangular
    solves and ``up``/``down`` themselves. Components that are zero on either side (fp16 files
    flush tiny ones to zero) contribute nothing and are left out of the small matrices. None
    when a factor is too ill-conditioned.
    """
    gram_up, gram_down = gram(up).double(), gram(down, rows=True).double()
    live = (gram_up.diagonal() > 0) & (gram_down.diagonal() > 0) & (scale != 0)
    count = int(live.sum())
    if count == 0 or count > min(up.shape[0], down.shape[1]):
        return None
    left = _cholesky_factor(gram_up[live][:, live])
    right = _cholesky_factor(gram_down[live][:, live])
    if left is None or right is None:
        return None
    (chol_up, norms_up), (chol_down, norms_down) = left, right
    core = chol_up.T @ ((norms_up * scale[live] * norms_down)[:, None] * chol_down)
    # eigh of C Cᵀ is twice as fast as an SVD of C; float64 keeps σ accurate to 1e-8 σ_max
    squares, core_u = torch.linalg.eigh(gram(core, rows=True))
    squares, core_u = squares.flip(0).clamp(min=0), core_u.flip(1)
    s = squares.sqrt()

    def leading(k: int) -> tuple[torch.Tensor, torch.Tensor]:
        # Only the kept vectors are mapped back: two [R, R] × [R, k] solves instead of [R, R] × [R, R].
        u, values = core_u[:, :k], s[:k]
        v = (core.T @ u) / torch.where(values > 0, values, torch.ones_like(values))
        to_left = torch.zeros(up.shape[1], k, dtype=torch.float64, device=up.device)
        to_left[live] = torch.linalg.solve_triangular(chol_up.T, u, upper=True) / norms_up[:, None]
        to_right = torch.zeros(k, up.shape[1], dtype=torch.float64, device=up.device)
        to_right[:, live] = torch.linalg.solve_triangular(chol_down, v.T, upper=False, left=False) / norms_down
        return to_left.to(up.dtype), to_right.to(up.dtype)

    return Spectrum(None, s, None, left=up, right=down.T, method="cholesky", leading=leading)


def concatenate(parts: Sequence[tuple[torch.Tensor, torch.Tensor, float]],
                dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of ``Σ c_i · up_i @ down_i``: ``up = [c_1 up_1, …]``, ``down = [down_1; …]``, exactly."""
    dtype = dtype or work_dtype(*(t for up, down, _ in parts for t in (up, down)))
    return stack([(up.to(dtype) * coefficient, down) for up, down, coefficient in parts], dtype)


def stack(factors: Sequence[tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``([up_1, up_2, …], [down_1; down_2; …])`` in ``dtype``: each factor is converted straight into
    its place, one pass over its values (instead of a converted copy and then a concatenated one)."""
    first_up, first_down = factors[0]
    rank = sum(up.shape[1] for up, _ in factors)
    up = torch.empty(first_up.shape[0], rank, dtype=dtype, device=first_up.device)
    down = torch.empty(rank, first_down.shape[1], dtype=dtype, device=first_down.device)
    start = 0
    for part_up, part_down in factors:
        end = start + part_up.shape[1]
        up[:, start:end].copy_(part_up)
        down[start:end].copy_(part_down)
        start = end
    return up, down


def balance(up: torch.Tensor, down: torch.Tensor, coefficient: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of ``coefficient · up @ down`` with the coefficient spread so both have equal norm.

    The product is unchanged; spreading the scale keeps small alphas and weights from pushing
    one factor toward fp16's subnormal range.
    """
    up_norm, down_norm = float(up.norm()), float(down.norm())
    if coefficient == 0 or up_norm == 0 or down_norm == 0:
        return up * coefficient, down
    gain = (down_norm / (abs(coefficient) * up_norm)) ** 0.5
    return up * (coefficient * gain), down / gain


def frobenius_inner(up_a: torch.Tensor, down_a: torch.Tensor, up_b: torch.Tensor, down_b: torch.Tensor) -> float:
    """``⟨up_a @ down_a, up_b @ down_b⟩_F`` from small Gram matrices (no dense product)."""
    dtype = torch.float64
    left = up_a.to(dtype).T @ up_b.to(dtype)
    right = down_b.to(dtype) @ down_a.to(dtype).T
    return float((left * right.T).sum())


def relative_distance(up_a: torch.Tensor, down_a: torch.Tensor, up_b: torch.Tensor, down_b: torch.Tensor) -> float:
    """``‖A − B‖_F / ‖B‖_F`` for ``A = up_a @ down_a`` and ``B = up_b @ down_b``, exactly from factors."""
    aa = frobenius_inner(up_a, down_a, up_a, down_a)
    bb = frobenius_inner(up_b, down_b, up_b, down_b)
    ab = frobenius_inner(up_a, down_a, up_b, down_b)
    if bb <= 0:
        return 0.0 if aa <= 0 else float("inf")
    return max(0.0, aa - 2 * ab + bb) ** 0.5 / bb ** 0.5


def norm_ratio(up_a: torch.Tensor, down_a: torch.Tensor, up_b: torch.Tensor, down_b: torch.Tensor) -> float:
    """``‖A‖_F / ‖B‖_F`` for ``A = up_a @ down_a`` and ``B = up_b @ down_b`` (1.0 when B is zero)."""
    bb = frobenius_inner(up_b, down_b, up_b, down_b)
    if bb <= 0:
        return 1.0
    return (max(0.0, frobenius_inner(up_a, down_a, up_a, down_a)) / bb) ** 0.5


def dense_svd(matrix: torch.Tensor, rank: int | None = None, *, method: str = "auto",
              oversample: int = 10, power_iterations: int = 4, seed: int = 0) -> Spectrum:
    """The SVD of a dense matrix: exact, or randomized for the top ``rank`` singular triplets.

    ``auto`` is exact unless ``rank`` plus ``oversample`` is well below both dimensions. The
    randomized method (range finder with ``power_iterations`` re-orthonormalised power steps)
    returns the top ``rank + oversample`` triplets; it is exact when the matrix has at most that
    rank and otherwise within a tiny factor of the optimal error for decaying spectra.
    """
    if method not in SVD_METHODS:
        raise ValueError(f"unknown SVD method {method!r}")
    matrix = matrix.to(work_dtype(matrix))
    m, n = matrix.shape
    width = None if rank is None else min(rank + oversample, m, n)
    if method == "auto":
        method = "randomized" if width is not None and 4 * width <= min(m, n) else "exact"
    if method == "exact" or width is None:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        return Spectrum(u, s.double(), vh, method="exact")
    generator = torch.Generator().manual_seed(seed)
    probe = torch.randn(n, width, generator=generator, dtype=matrix.dtype).to(matrix.device)  # the same on every device
    basis, _ = torch.linalg.qr(matrix @ probe)
    for _ in range(power_iterations):
        co_basis, _ = torch.linalg.qr(matrix.T @ basis)
        basis, _ = torch.linalg.qr(matrix @ co_basis)
    small_u, s, vh = torch.linalg.svd(basis.T @ matrix, full_matrices=False)
    energy = float(matrix.norm()) ** 2
    return Spectrum(small_u, s.double(), vh, left=basis, total_energy=energy, method="randomized")
