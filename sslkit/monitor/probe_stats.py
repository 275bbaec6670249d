"""Collapse statistics for the probe set: the encoder's pooled deepest features of fixed crops.

The bank statistics in metrics.py judge the objective's embeddings (projector outputs), which a healthy run
spreads around the origin: mean cosine ~0, normalised std ~1. Pooled backbone features are different. After
a LayerNorm and a global average pool every crop shares one large mean direction, so their raw mean cosine
is near 1 and their normalised std near 0 in a healthy encoder too, and those two numbers say nothing about
collapse there. Centring fixes the direction problem but makes std and cosine trivial (normalised centred rows
always give std ~1 and mean cosine ~-1/(N-1)). What does separate a working encoder from a collapsed one is
how much the features move with the input relative to their size, and in how many directions they move:

    spread          = sqrt( mean_i ||z_i - m||^2 / mean_i ||z_i||^2 ),  m = mean_i z_i,   in [0, 1]
                      0 when every crop gives the same features (the encoder ignores its input)
    centred_rankme  = RankMe effective rank of the centred features Z - m (Garrido et al. 2023), in
                      [1, min(N-1, D)]: 1 when the crops differ along one direction only (dimensional collapse);
                      NaN when they do not differ at all (spread 0 says that already)

Measured on the README demo recipe (BYOL, Swin-UNETR feature size 12, 3 demo scans), 8 probe crops of 48^3
placed by sslkit.data.probe.probe_windows (in brackets: the old jittered centre crops):
    encoder                                      spread         centred rank  raw mean cos     raw std
    random initialisation                        0.23 (0.10)    5.0 (5.3)     0.94 (0.99)      0.21 (0.09)
    README run (healthy, 120 steps), step 40     0.16 (0.08)    2.4 (2.2)     0.97 (0.99)      0.13 (0.06)
                                     step 80     0.12 (0.07)    2.5 (2.1)     0.98 (0.99)      0.10 (0.06)
                                     step 120    0.13 (0.10)    2.5 (1.9)     0.98 (0.99)      0.10 (0.08)
    40-step run, BatchNorm heads (healthy)       0.32 (0.14)    3.1 (2.7)     0.88 (0.98)      0.27 (0.12)
    40-step run, LayerNorm heads (collapsed; its bank alarm fired at step 37)
                                     step 20     0.019 (0.008)  4.7 (5.5)     0.9996 (0.9999)  0.016 (0.007)
                                     step 40     0.017 (0.007)  4.5 (5.4)     0.9997 (0.9999)  0.014 (0.006)
    patch embedding weights x 1e-3               0.0002         2.1-2.7       1.00             0.0001
    patch embedding zeroed / all weights x 1e-3  0              nan           1.00             0
    features projected on one direction          0.16-0.31      1.0           0.89-0.97        0.13-0.24
The collapse thresholds (spread below 0.05, centred_rankme below 1.5; sslkit.monitor.alarms.HEALTH_BANDS) sit
between these groups. The raw statistics cannot separate them: on the old centre crops the healthy README run
had a raw mean cosine of 0.99 (inside the bank's collapsed range) and a raw RankMe of 1.4-1.5, and the collapsed
run differs from the healthy ones only in the third decimal of the raw cosine.
"""

from __future__ import annotations

import math

import torch

from sslkit.monitor.metrics import as_embedding_matrix, effective_rank


def relative_spread(z: torch.Tensor) -> float:
    """sqrt(mean_i ||z_i - m||^2 / mean_i ||z_i||^2) for z (N, D), m the mean row; NaN for N < 2 or z == 0.

    Scale-free; equals sqrt(1 - ||m||^2 / mean_i ||z_i||^2), so it is 0 exactly when all rows are equal.
    """
    z = as_embedding_matrix(z)
    if z.shape[0] < 2:
        return float("nan")
    total = (z * z).sum(1).mean()
    if not torch.isfinite(total) or total <= 0:
        return float("nan")
    centred = z - z.mean(0, keepdim=True)
    return math.sqrt(float((centred * centred).sum(1).mean() / total))


def probe_feature_statistics(z: torch.Tensor, prefix: str = "probe/") -> dict[str, float]:
    """Probe-set statistics of pooled features z (N, D): spread, centred_rankme and centred_rankme_ratio
    (centred_rankme / min(N - 1, D), the most a centred N-row matrix can have). The names differ from the raw
    statistics older runs logged as probe/rankme etc., so old and new values are never judged alike."""
    z = as_embedding_matrix(z)
    n, d = z.shape
    centred = z - z.mean(0, keepdim=True)
    rank = effective_rank(centred) if n >= 2 else float("nan")
    top = min(n - 1, d)
    return {
        f"{prefix}spread": relative_spread(z),
        f"{prefix}centred_rankme": rank,
        f"{prefix}centred_rankme_ratio": rank / top if top > 0 else float("nan"),
    }
