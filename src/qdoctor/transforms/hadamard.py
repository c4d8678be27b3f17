"""Hadamard matrices and orthogonal Hadamard rotations (QuaRot / SpinQuant without learning).

A Hadamard matrix H of order n has entries ±1 and H Hᵀ = n I, so R = H / √n is orthogonal.
Constructions here (all deterministic):

- Sylvester, n = 2^k:           H_1 = [1],  H_2n = [[H_n, H_n], [H_n, −H_n]]  (symmetric);
- Paley I, n = q + 1, q ≡ 3 (mod 4) prime:  H = I + S,  S = [[0, 1ᵀ], [−1, Q]];
- Paley II, n = 2(q + 1), q ≡ 1 (mod 4) prime: S = [[0, 1ᵀ], [1, Q]] with every 0 replaced by
  [[1, −1], [−1, −1]] and every ±1 by ±[[1, 1], [1, −1]];

where Q_ij = χ(j − i) is the Jacobsthal matrix of the Legendre symbol χ mod q (Paley 1933).
Other orders n = m · 2^k: the Kronecker product H_m ⊗ H_{2^k} with the smallest m = (odd part
of n) · 2^j that Paley constructs (12 = 11+1, 20 = 19+1, 28 = 2·14, 36 = 2·18, 44, 60, …).
SmolLM2: hidden 576 = 36·16, intermediate 1536 = 12·128; Gemma-3-270M hidden 640 = 20·32.

Fast apply (``HadamardRotation.apply``): for x of length n = m·b seen as an m × b matrix X,

    x (H_m ⊗ H_b) = vec(H_mᵀ X H_b)

— a fast Walsh–Hadamard transform over the b axis (log₂ b butterfly passes) and an m × m
matmul over the other; O(n log b + n m) per row instead of O(n²).

A *block-diagonal* rotation I_m ⊗ (H_b / √b) (b the largest power of two dividing n) is what
compressed-tensors' deterministic ``hadamard`` transform with ``head_dim = b`` builds, and what
vLLM's Hadacore kernel applies online: the online R4 uses that one (``block_rotation``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from qdoctor.errors import QDoctorError


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def sylvester(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Sylvester's H_n (n a power of two): H_2n = [[H_n, H_n], [H_n, −H_n]]."""
    if not is_power_of_two(n):
        raise QDoctorError(f"Sylvester's construction needs a power of two, got {n}")
    h = torch.ones(1, 1, dtype=dtype)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def jacobsthal(q: int) -> torch.Tensor:
    """Q_ij = χ(j − i) for a prime q (χ: Legendre symbol; χ(0) = 0)."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in squares else -1.0 for a in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def paley_kind(n: int) -> str | None:
    """"I" or "II" when a Paley construction with a prime q gives order ``n``, else None."""
    if _is_prime(n - 1) and (n - 1) % 4 == 3:
        return "I"
    if n % 2 == 0 and _is_prime(n // 2 - 1) and (n // 2 - 1) % 4 == 1:
        return "II"
    return None


def paley(n: int) -> torch.Tensor:
    """A Hadamard matrix of order ``n`` by Paley's construction I or II (module docstring)."""
    kind = paley_kind(n)
    if kind is None:
        raise QDoctorError(f"no Paley construction (with a prime q) gives a Hadamard matrix of order {n}")
    q = n - 1 if kind == "I" else n // 2 - 1
    ones = torch.ones(q, dtype=torch.float64)
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:] = ones
    s[1:, 0] = -ones if kind == "I" else ones
    s[1:, 1:] = jacobsthal(q)
    if kind == "I":
        return torch.eye(q + 1, dtype=torch.float64) + s
    zero_block = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    sign_block = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(s, sign_block) + torch.kron((s == 0).double(), zero_block)


def small_factor(n: int) -> int:
    """The smallest m with n = m · 2^k that is 1 or a Paley order (the non-Sylvester factor)."""
    if n < 1:
        raise QDoctorError(f"a Hadamard rotation needs a positive size, got {n}")
    odd = n
    while odd % 2 == 0:
        odd //= 2
    m = odd
    while n % m == 0:
        if m == 1 or paley_kind(m) is not None:
            return m
        m *= 2
    raise QDoctorError(f"no Hadamard matrix of order {n} is constructed here: {n} = {odd}·2^k and no "
                       f"{odd}·2^j ≤ {n} is a Paley order (q + 1 or 2(q + 1), q prime)")


@lru_cache(maxsize=32)
def _factor_matrix(m: int) -> torch.Tensor:
    return torch.ones(1, 1, dtype=torch.float64) if m == 1 else (sylvester(m) if is_power_of_two(m) else paley(m))


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A Hadamard matrix of order n: H_m ⊗ H_{n/m} (m = ``small_factor(n)``)."""
    m = small_factor(n)
    return torch.kron(_factor_matrix(m), sylvester(n // m)).to(dtype)


def fwht(x: torch.Tensor) -> torch.Tensor:
    """x H_b along the last axis (b a power of two, Sylvester's H_b, unnormalized): log₂ b butterfly
    passes (a, c) → (a + c, a − c) at strides 1, 2, 4, …"""
    b = x.shape[-1]
    if not is_power_of_two(b):
        raise QDoctorError(f"the fast Walsh–Hadamard transform needs a power of two, got {b}")
    shape, h = x.shape, 1
    while h < b:
        y = x.reshape(*shape[:-1], b // (2 * h), 2, h)
        x = torch.stack((y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]), dim=-2)
        h *= 2
    return x.reshape(shape)


@dataclass(frozen=True)
class HadamardRotation:
    """The orthogonal R of size ``size`` = factor · b (b a power of two):

    - ``block_diagonal=False``: R = (H_factor ⊗ H_b) / √size;
    - ``block_diagonal=True``:  R = I_factor ⊗ (H_b / √b) — Sylvester blocks, symmetric."""

    size: int
    factor: int = 1
    block_diagonal: bool = False

    def __post_init__(self):
        if self.size % self.factor or not is_power_of_two(self.size // self.factor):
            raise QDoctorError(f"Hadamard rotation of size {self.size}: {self.factor} does not leave a power of two")

    @property
    def block(self) -> int:
        return self.size // self.factor

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """R as a dense matrix."""
        hb = sylvester(self.block)
        if self.block_diagonal:
            r = torch.kron(torch.eye(self.factor, dtype=torch.float64), hb) / math.sqrt(self.block)
        else:
            r = torch.kron(_factor_matrix(self.factor), hb) / math.sqrt(self.size)
        return r.to(dtype)

    def apply(self, x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """x R (or x Rᵀ with ``transpose``) along the last axis, computed in x's dtype:
        vec(H_mᵀ X H_b) / √n for X = x viewed as factor × b (module docstring)."""
        if x.shape[-1] != self.size:
            raise QDoctorError(f"Hadamard rotation of size {self.size} applied to a last axis of {x.shape[-1]}")
        shape = x.shape
        y = fwht(x.reshape(*shape[:-1], self.factor, self.block))
        if self.block_diagonal:
            return (y / math.sqrt(self.block)).reshape(shape)
        if self.factor > 1:
            hm = _factor_matrix(self.factor).to(device=x.device, dtype=x.dtype)
            y = (hm if transpose else hm.T) @ y  # x R: H_mᵀ X; x Rᵀ: H_m X (H_b is symmetric)
        return (y / math.sqrt(self.size)).reshape(shape)


def rotation_for(n: int) -> HadamardRotation:
    """The full rotation (H_m ⊗ H_{n/m}) / √n of size n (``small_factor``)."""
    return HadamardRotation(size=n, factor=small_factor(n))


def block_rotation(n: int) -> HadamardRotation:
    """I_m ⊗ H_b / √b with b the largest power of two dividing n (compressed-tensors' ``hadamard``
    with ``head_dim = b``; vLLM's Hadacore); refused when b = 1 (not a rotation that mixes anything)."""
    b = n & -n
    if b < 2:
        raise QDoctorError(f"size {n} is odd: no block Hadamard rotation")
    return HadamardRotation(size=n, factor=n // b, block_diagonal=True)
