"""Collapse statistics of a batch of embeddings. Pure functions of tensors; no state.

All functions take embeddings z of shape (N, D) (one row per sample) and return a Python float.
Statistics are computed in float64 on the tensor's device, so fp16/bf16 inputs are safe.

    >>> z = torch.randn(256, 128)
    >>> embedding_std(z), effective_rank(z), mean_pairwise_cosine(z)   # ~1.0, ~110, ~0.0

Healthy / collapsed reference values:
    embedding_std          ~1 healthy (isotropic on the sphere), 0 when every sample maps to one point
    effective_rank         up to min(N, D); 1 when all rows are parallel (RankMe, Garrido et al. 2023)
    mean_pairwise_cosine   ~0 healthy, 1 when every sample maps to one direction
    teacher_student_cosine 1 when student and teacher agree exactly (BYOL drives it up; a value stuck at 1
                           from the start together with low embedding_std is the trivial solution)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_EPS = 1e-12


def as_embedding_matrix(z: torch.Tensor) -> torch.Tensor:
    """Bring embeddings to (N, D) float64: (N, D) as is, (N, C, *spatial) mean-pooled over space, (D,) -> (1, D)."""
    z = z.detach()
    if z.ndim == 1:
        z = z.unsqueeze(0)
    elif z.ndim > 2:
        z = z.flatten(2).mean(-1)  # (N, C, *spatial) -> (N, C)
    return z.to(torch.float64)


def embedding_std(z: torch.Tensor) -> float:
    """Mean over dimensions of the per-dimension std of L2-normalised embeddings, times sqrt(D).

    std_j = std_i( z_ij / ||z_i|| );  result = sqrt(D) * mean_j std_j
    Isotropic embeddings give ~1, a collapsed batch (all rows equal) gives 0. NaN for fewer than 2 rows.
    """
    z = as_embedding_matrix(z)
    n, d = z.shape
    if n < 2:
        return float("nan")
    zn = F.normalize(z, dim=1, eps=_EPS)
    return float(zn.std(dim=0, correction=0).mean() * math.sqrt(d))


def singular_values(z: torch.Tensor) -> torch.Tensor:
    """Singular values of z (N, D), via the eigenvalues of the smaller Gram matrix (cheap for N << D)."""
    z = as_embedding_matrix(z)
    gram = z @ z.T if z.shape[0] <= z.shape[1] else z.T @ z  # (k, k), k = min(N, D)
    eig = torch.linalg.eigvalsh(gram).clamp_min(0.0)
    return eig.sqrt().flip(0)


def effective_rank(z: torch.Tensor) -> float:
    """RankMe effective rank: exp of the entropy of the normalised singular values.

    p_k = s_k / sum(s) + eps;  rank = exp(-sum_k p_k log p_k), between 1 and min(N, D).
    A matrix with r equal non-zero singular values has effective rank exactly r. NaN for an empty or all-zero z.
    """
    s = singular_values(z)
    total = s.sum()
    if s.numel() == 0 or not torch.isfinite(total) or total <= 0:
        return float("nan")
    p = s / total + 1e-7
    return float(torch.exp(-(p * p.log()).sum()))


def mean_pairwise_cosine(z: torch.Tensor) -> float:
    """Mean cosine similarity over all ordered pairs of distinct rows (diagonal excluded).

    mean_{i != j} <z_i, z_j> / (||z_i|| ||z_j||). Equals 1 when all rows point the same way. NaN below 2 rows.
    Computed as (||sum_i zn_i||^2 - N) / (N (N - 1)), so memory stays O(N D).
    """
    z = as_embedding_matrix(z)
    n = z.shape[0]
    if n < 2:
        return float("nan")
    zn = F.normalize(z, dim=1, eps=_EPS)
    s = zn.sum(0)
    diag = (zn * zn).sum()  # N, or fewer when rows are zero
    return float(((s @ s) - diag) / (n * (n - 1)))


def teacher_student_cosine(z_student: torch.Tensor, z_teacher: torch.Tensor) -> float:
    """Mean cosine between paired rows of student and teacher embeddings, both (N, D)."""
    zs, zt = as_embedding_matrix(z_student), as_embedding_matrix(z_teacher)
    if zs.shape != zt.shape:
        raise ValueError(f"student embeddings {tuple(zs.shape)} and teacher embeddings {tuple(zt.shape)} "
                         "must have the same shape")
    if zs.shape[0] == 0:
        return float("nan")
    return float(F.cosine_similarity(zs, zt.to(zs.device), dim=1, eps=_EPS).mean())


def collapse_statistics(z: torch.Tensor, prefix: str = "monitor/") -> dict[str, float]:
    """All bank statistics of z (N, D) under `prefix`: embedding_std, rankme, rankme_ratio, mean_cosine."""
    z = as_embedding_matrix(z)
    n, d = z.shape
    rank = effective_rank(z)
    return {
        f"{prefix}embedding_std": embedding_std(z),
        f"{prefix}rankme": rank,
        f"{prefix}rankme_ratio": rank / min(n, d) if n and d else float("nan"),
        f"{prefix}mean_cosine": mean_pairwise_cosine(z),
    }
