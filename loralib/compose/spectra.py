"""The singular value decomposition of any module's ``ΔW``, by the cheapest exact route for its kind.

- LoRA and LoHa: the QR/Cholesky route of :func:`loralib.compose.lowrank.product_svd` on the exact
  low-rank factors (LoHa's face-splitting factors, rank ``r1·r2``); no ``m × n`` matrix.
- LoKr: ``s · kron(W1, W2)`` has the singular values ``|s| σ_i(W1) σ_j(W2)`` with singular vectors
  ``kron(u_i, u'_j)`` and ``kron(v_i, v'_j)``, so the SVDs of the two small factors give the exact
  spectrum (:class:`KronSpectrum`); the best rank-k approximation takes the k largest products.
- Full differences and DoRA (given the base weight): a dense SVD, exact or randomized
  (:func:`loralib.compose.lowrank.dense_svd`: range finder with power iterations). The randomized
  spectrum knows ``‖ΔW‖_F`` exactly, so the reported retained energy and error of what is kept
  are exact; by Halko, Martinsson & Tropp (2011, Cor. 10.10) its expected spectral error is at most
  ``(1 + 6·√((k+p)·min(m,n))/p)^(1/(2q+1)) · σ_{k+1}`` for ``p`` oversampling columns and ``q`` power
  iterations (here p = 10, q = 4), i.e. within a few percent of optimal for decaying spectra.
  Memory: one module's ``ΔW`` at a time, plus ``(m + n)(k + p)`` values.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..lycoris.shapes import product
from .lowrank import Spectrum, balance, dense_svd, product_svd
from .rank_rules import RankRule
from .report import ModuleReport


def _left_vectors(spectrum: Spectrum, index: torch.Tensor) -> torch.Tensor:
    """Columns ``index`` of the left singular vectors ``U``."""
    core = spectrum.cores(spectrum.size)[0][:, index]
    return core if spectrum.left is None else spectrum.left @ core.to(spectrum.left.dtype)


def _right_vectors(spectrum: Spectrum, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` of ``Vᵀ``."""
    core = spectrum.cores(spectrum.size)[1][index]
    return core if spectrum.right is None else core.to(spectrum.right.dtype) @ spectrum.right.T


@dataclass
class KronSpectrum(Spectrum):
    """The exact SVD of ``coefficient · kron(A, B)`` from the SVDs of ``A`` and ``B``."""

    first: Spectrum | None = None
    second: Spectrum | None = None
    coefficient: float = 1.0
    pairs: tuple[torch.Tensor, torch.Tensor] = field(default_factory=lambda: (torch.empty(0), torch.empty(0)))

    @classmethod
    def of(cls, first: Spectrum, second: Spectrum, coefficient: float) -> KronSpectrum:
        """Combine the factors' spectra: every product of singular values, largest first."""
        products = abs(coefficient) * first.singular_values[:, None] * second.singular_values[None, :]
        order = torch.argsort(products.flatten(), descending=True, stable=True)
        width = second.size
        energy = coefficient ** 2 * first.energy * second.energy
        return cls(torch.empty(0), products.flatten()[order], torch.empty(0), total_energy=energy, method="kronecker",
                   first=first, second=second, coefficient=coefficient, pairs=(order // width, order % width))

    def factors(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Balanced rank-``k`` factors ``(up, down)``: columns ``√σ · kron(u_i, u'_j)``, rows ``√σ · kron(v_i, v'_j)ᵀ``."""
        k = max(0, min(k, self.size))
        i, j = self.pairs[0][:k], self.pairs[1][:k]
        u1, u2 = _left_vectors(self.first, i), _left_vectors(self.second, j)
        v1, v2 = _right_vectors(self.first, i), _right_vectors(self.second, j)
        dtype = u1.dtype
        root = self.singular_values[:k].sqrt().to(dtype)
        sign = -1.0 if self.coefficient < 0 else 1.0
        up = (u1[:, None, :] * u2.to(dtype)[None, :, :]).reshape(-1, k) * (sign * root)
        down = root[:, None] * (v1[:, :, None] * v2.to(dtype)[:, None, :]).reshape(k, -1)
        return up, down


def _small_svd(matrix: torch.Tensor) -> Spectrum:
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return Spectrum(u, s.double(), vh, method="exact")


def _factor_spectrum(factors: tuple[torch.Tensor, torch.Tensor] | None, matrix) -> Spectrum:
    """The exact SVD of a LoKr factor: by the product route when it is decomposed, else densely (it is small)."""
    if factors is not None:
        return product_svd(*factors)
    return _small_svd(matrix())


def module_spectrum(module, wanted: int | None = None, *, base: torch.Tensor | None = None, svd: str = "auto",
                    seed: int = 0) -> Spectrum:
    """The SVD of ``module``'s ``ΔW`` as a matrix ``[out, in·kh·kw]``.

    ``wanted`` is the rank that will be kept (None: the whole spectrum, for dynamic rules); dense
    kinds then use a randomized SVD where ``svd`` allows. ``base`` is the layer's weight (DoRA only).
    """
    if module.kind == "lokr":
        dtype = torch.float64 if module.dtype == torch.float64 else torch.float32
        first = _factor_spectrum(module.left_factors(dtype), lambda: module.left(dtype))
        second = _factor_spectrum(module.right_factors(dtype), lambda: module.right(dtype))
        return KronSpectrum.of(first, second, module.scale)
    factors = module.low_rank()
    if factors is not None:
        up, down, coefficient = factors
        return product_svd(up, down, torch.full((up.shape[1],), coefficient, dtype=torch.float64))
    delta = module.delta(torch.float32, base)
    matrix = delta.reshape(module.out_features, -1)
    method = "exact" if wanted is None else svd
    return dense_svd(matrix, wanted, method=method, seed=seed)


def reduce_module(module, rule: RankRule, *, base: torch.Tensor | None = None, svd: str = "auto", seed: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor, ModuleReport]:
    """The best approximation of ``module``'s ``ΔW`` allowed by ``rule``, as balanced factors, and its report.

    Dynamic rules read the whole spectrum, so dense kinds then take the exact SVD.
    """
    wanted = None if rule.is_dynamic else int(rule.value)
    spectrum = module_spectrum(module, wanted, base=base, svd=svd, seed=seed)
    keep = rule.choose(spectrum.singular_values)
    up, down = spectrum.factors(keep)
    full = module.exact_rank or min(module.out_features, down.shape[1])
    return up, down, ModuleReport(int(full), keep, spectrum.retained(keep), spectrum.error(keep))


def lora_factors(module, rule: RankRule | None, *, base: torch.Tensor | None = None, svd: str = "auto", seed: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor, ModuleReport]:
    """Plain LoRA factors ``(up, down)`` of any module: its exact low-rank form without a rule, else the
    best approximation ``rule`` allows (Eckart–Young), with the report of what was kept.

    Kinds without a low-rank form (full differences, DoRA), and low-rank forms wider than the layer,
    are factorised by a full-rank SVD when no rule is given: exact up to rounding, which the report
    states.
    """
    out, flat = module.out_features, product(module.weight_shape[1:])
    if rule is None:
        factors = module.low_rank()
        if factors is not None and factors[0].shape[1] <= min(out, flat):
            up, down, coefficient = factors
            up, down = balance(up, down, coefficient)
            return up, down, ModuleReport(int(down.shape[0]), int(down.shape[0]))
        rule = RankRule("fixed", min(out, flat))
    return reduce_module(module, rule, base=base, svd=svd, seed=seed)
