"""CPA: contrastive prototype assignments, PUNet's dense self-supervision (SPECS.md "PUNet", Fig. 2 of
`papers/punet_prompt_tuning_readme.txt`).

From each image the objective cuts a teacher view (larger crop, no augmentation) and two student views (smaller
crops inside the teacher's, resampled, with a masked box and / or a strong contrast change). Every view knows the
voxel coordinates (in the source image) of each of its feature positions.

    F^t = EMA teacher dense embedding of the teacher view      (B, Mt, D)   (no grad)
    C   = prototypes: F^t pooled on a coarse grid, refined by 3 soft k-means iterations with assignments
          softmax_K(cos(F^t, C) / 0.033) * exp(-4 ln2 |x - x_C|^2 / FWHM^2)   (FWHM 128 voxels, z distance x2)
    Q^t = softmax_K(cos(F^t, C) / 0.033)                       targets
    Q^s = softmax_K(cos(F^s, C) / 0.066)                       student assignments
    each student position is paired with the nearest teacher position in source coordinates, kept if within
    4 voxels;  loss = mean over kept positions of  -sum_K Q^t log Q^s

The dense embedding is `encoder.dense(x)` (PUNet's decoder output) when the encoder has it, else the shallowest
stage map. The EMA teacher (tau 0.99) moves once per optimizer step.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sslkit.objectives.base import ForwardContext, Objective, ObjectiveOutput, pooled
from sslkit.objectives.registry import register_objective
from sslkit.objectives.teacher import EMATeacher

# ------------------------------------------------------------------------------------------- coordinates


def grid_coords(start: torch.Tensor, length: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Source-image coordinates of the positions of a map of `size` that covers the crop [start, start + length)
    (resampled with align_corners=False): start, length (B, n) -> (B, M, n), positions row-major over `size`.

    Position j along an axis sits at start + (j + 0.5) * length / size - 0.5.
    """
    axes = []
    for a, s in enumerate(size):
        j = torch.arange(s, dtype=torch.float32, device=start.device)
        axes.append(start[:, a, None].float() + (j + 0.5) * (length[:, a, None].float() / s) - 0.5)  # (B, s)
    b = start.shape[0]
    mesh = []
    for a, s in enumerate(size):
        shape = [b] + [1] * len(size)
        shape[1 + a] = s
        mesh.append(axes[a].view(shape).expand(b, *size))
    return torch.stack(mesh, dim=-1).reshape(b, -1, len(size))  # (B, *size, n) -> (B, M, n)


def pair_nearest(coords: torch.Tensor, start: torch.Tensor, length: torch.Tensor, size: Sequence[int],
                 max_dist: float = 4.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest position of a regular grid (the teacher map: crop start / length, map `size`) for each query
    coordinate: coords (B, M, n) -> flat index (B, M) into the grid and keep (B, M) (distance <= max_dist).

    The grid is separable and axis-aligned, so the Euclidean nearest point is the nearest point per axis.
    """
    idx = torch.zeros(coords.shape[:2], dtype=torch.long, device=coords.device)
    dist2 = torch.zeros(coords.shape[:2], dtype=torch.float32, device=coords.device)
    for a, s in enumerate(size):
        step = length[:, a, None].float() / s  # (B, 1)
        st = start[:, a, None].float()
        j = torch.round((coords[..., a] + 0.5 - st) / step - 0.5).clamp(0, s - 1)  # (B, M)
        pos = st + (j + 0.5) * step - 0.5
        dist2 = dist2 + (coords[..., a] - pos) ** 2
        idx = idx * s + j.long()
    return idx, dist2.sqrt() <= max_dist


# ------------------------------------------------------------------------------------------- prototypes


def spatial_weight(coords: torch.Tensor, centres: torch.Tensor, fwhm: float = 128.0,
                   z_scale: float = 2.0) -> torch.Tensor:
    """Gaussian weight exp(-4 ln2 d^2 / FWHM^2): coords (B, M, n), centres (B, K, n) -> (B, M, K); in 3D the
    distance along the last (z) axis counts `z_scale` times."""
    diff = coords[:, :, None, :] - centres[:, None, :, :]  # (B, M, K, n)
    if coords.shape[-1] == 3 and z_scale != 1.0:
        scale = torch.tensor([1.0, 1.0, z_scale], device=coords.device, dtype=diff.dtype)
        diff = diff * scale
    return torch.exp(-4.0 * math.log(2.0) * diff.pow(2).sum(-1) / fwhm ** 2)


def soft_kmeans(feats: torch.Tensor, coords: torch.Tensor, seeds: torch.Tensor, seed_coords: torch.Tensor,
                iters: int = 3, temperature: float = 0.033, fwhm: float = 128.0,
                z_scale: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Spatially weighted soft k-means on the unit sphere.

    feats (B, M, D), coords (B, M, n), seeds (B, K, D), seed_coords (B, K, n) -> prototypes (B, K, D) (unit norm)
    and their coordinates (B, K, n). Each iteration: A = softmax_K(cos(f, c) / T) * G(x_f, x_c);
    c <- normalize(sum_m A_mk f_m / sum_m A_mk); x_c <- sum_m A_mk x_m / sum_m A_mk.
    """
    f = F.normalize(feats, dim=-1)
    c = F.normalize(seeds, dim=-1)
    xc = seed_coords
    for _ in range(iters):
        a = torch.softmax(f @ c.transpose(1, 2) / temperature, dim=-1)  # (B, M, K)
        a = a * spatial_weight(coords, xc, fwhm, z_scale)
        norm = a.sum(1).clamp_min(1e-12)  # (B, K)
        c = F.normalize(a.transpose(1, 2) @ f / norm[..., None], dim=-1)  # (B, K, D)
        xc = a.transpose(1, 2) @ coords / norm[..., None]  # (B, K, n)
    return c, xc


def cpa_cross_entropy(f_student: torch.Tensor, f_teacher: torch.Tensor, keep: torch.Tensor,
                      prototypes: torch.Tensor, t_teacher: float = 0.033, t_student: float = 0.066) -> torch.Tensor:
    """-sum_K softmax(cos(f_t, C)/t_t) log softmax(cos(f_s, C)/t_s), averaged over kept positions.

    f_student (B, M, D), f_teacher (B, M, D) (the paired teacher features), keep (B, M) bool, prototypes (B, K, D).
    """
    c = F.normalize(prototypes, dim=-1)
    q_t = torch.softmax(F.normalize(f_teacher, dim=-1) @ c.transpose(1, 2) / t_teacher, dim=-1)  # (B, M, K)
    log_q_s = torch.log_softmax(F.normalize(f_student, dim=-1) @ c.transpose(1, 2) / t_student, dim=-1)
    ce = -(q_t * log_q_s).sum(-1)  # (B, M)
    w = keep.to(ce.dtype)
    return (ce * w).sum() / w.sum().clamp_min(1.0)


# ------------------------------------------------------------------------------------------- views


def crop_resample(image: torch.Tensor, start: torch.Tensor, length: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Per-sample crop [start, start + length) resampled to `size`: (B, C, *S) -> (B, C, *size)."""
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[image.ndim - 2]
    out = []
    for b in range(image.shape[0]):
        sl = tuple(slice(int(s), int(s) + int(n)) for s, n in zip(start[b], length[b]))
        crop = image[(b, slice(None), *sl)].unsqueeze(0)
        out.append(F.interpolate(crop, size=tuple(size), mode=mode, align_corners=False))
    return torch.cat(out)


def _rand(gen: torch.Generator, shape, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(shape, generator=gen)


@register_objective("cpa")
class CPA(Objective):
    """Options: tau (0.99 EMA), tau_schedule (constant | cosine), t_teacher (0.033), t_student (0.066),
    kmeans_iters (3), fwhm (128 voxels), z_scale (2), max_pair_dist (4 voxels), proto_grid (coarse seed grid;
    default 4 per axis), teacher_scale / student_scale (crop fraction ranges of the source image),
    teacher_size / student_size (view sizes; default the source size / 3/4 of it), mask_prob, contrast_prob,
    classes (prompt classes active in the forwards; None = the model's default), image_key, seed.
    """

    def __init__(self, encoder: nn.Module, tau: float = 0.99, tau_schedule: str = "constant",
                 t_teacher: float = 0.033, t_student: float = 0.066, kmeans_iters: int = 3, fwhm: float = 128.0,
                 z_scale: float = 2.0, max_pair_dist: float = 4.0, proto_grid: int | list[int] = 4,
                 teacher_scale: list[float] = (0.8, 1.0), student_scale: list[float] = (0.4, 0.7),
                 teacher_size: list[int] | None = None, student_size: list[int] | None = None,
                 mask_prob: float = 0.5, mask_scale: list[float] = (0.2, 0.4), contrast_prob: float = 0.5,
                 contrast_range: list[float] = (0.3, 2.0), classes: list[int] | None = None,
                 image_key: str = "image", seed: int = 0):
        super().__init__()
        if not 0.0 <= tau <= 1.0:
            raise ValueError(f"tau must be in [0, 1], got {tau}")
        for name, (lo, hi) in (("teacher_scale", teacher_scale), ("student_scale", student_scale)):
            if not 0.0 < lo <= hi <= 1.0:
                raise ValueError(f"{name} must be 0 < lo <= hi <= 1, got {list((lo, hi))}")
        self.t_teacher, self.t_student = t_teacher, t_student
        self.kmeans_iters, self.fwhm, self.z_scale = kmeans_iters, fwhm, z_scale
        self.max_pair_dist = max_pair_dist
        self.proto_grid = proto_grid
        self.teacher_scale, self.student_scale = tuple(teacher_scale), tuple(student_scale)
        self.teacher_size = None if teacher_size is None else tuple(teacher_size)
        self.student_size = None if student_size is None else tuple(student_size)
        self.mask_prob, self.mask_scale = mask_prob, tuple(mask_scale)
        self.contrast_prob, self.contrast_range = contrast_prob, tuple(contrast_range)
        self.classes = None if classes is None else list(classes)
        self.image_key = image_key
        self.gen = torch.Generator().manual_seed(seed)
        self.teacher = EMATeacher({"encoder": encoder}, tau, tau_schedule)

    def generators(self) -> dict[str, torch.Generator]:
        return {"views": self.gen}

    def teachers(self) -> dict[str, EMATeacher]:
        return {"teacher": self.teacher}

    # ----------------------------------------------------------------------------- views
    def _crops(self, b: int, src: torch.Tensor, scale, inside=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Random crops (start, length) (B, n) long, each a fraction `scale` of the source per axis; placed
        inside the crops `inside` = (start, length) when given."""
        n = src.numel()
        frac = _rand(self.gen, (b, n), *scale)
        if inside is None:
            lo, extent = torch.zeros(b, n, dtype=torch.long), src.expand(b, n)
        else:
            lo, extent = inside
        length = torch.round(frac * extent.float()).long().clamp_min(1)
        length = torch.minimum(length, extent)
        room = extent - length  # >= 0
        start = lo + torch.floor(torch.rand((b, n), generator=self.gen) * (room + 1).float()).long()
        return start, length

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        """Masked box (mask_prob) and strong contrast change (contrast_prob), per sample."""
        x = x.clone()
        b, spatial = x.shape[0], x.shape[2:]
        for i in range(b):
            if torch.rand((), generator=self.gen) < self.mask_prob:
                sl = []
                for s in spatial:
                    n = max(1, round(float(_rand(self.gen, (), *self.mask_scale)) * s))
                    st = int(torch.randint(0, s - n + 1, (), generator=self.gen))
                    sl.append(slice(st, st + n))
                x[(i, slice(None), *sl)] = 0.0
            if torch.rand((), generator=self.gen) < self.contrast_prob:
                a = float(_rand(self.gen, (), *self.contrast_range))
                mean = x[i].mean()
                x[i] = (x[i] - mean) * a + mean
        return x

    def make_views(self, image: torch.Tensor) -> dict:
        """teacher / student1 / student2: {"input": (B, C, *size), "start", "length": (B, n) in source voxels}."""
        b, spatial = image.shape[0], tuple(image.shape[2:])
        src = torch.tensor(spatial, dtype=torch.long)
        t_size = self.teacher_size or spatial
        s_size = self.student_size or tuple(max(4, round(0.75 * s)) for s in spatial)
        t_start, t_len = self._crops(b, src, self.teacher_scale)
        views = {"teacher": {"start": t_start, "length": t_len,
                             "input": crop_resample(image, t_start, t_len, t_size)}}
        for name in ("student1", "student2"):
            s_start, s_len = self._crops(b, src, self.student_scale, inside=(t_start, t_len))
            x = crop_resample(image, s_start, s_len, s_size)
            views[name] = {"start": s_start, "length": s_len, "input": self._augment(x)}
        return views

    # ----------------------------------------------------------------------------- features
    def _dense(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if hasattr(net, "dense"):
            return net.dense(x, self.classes)
        return net(x)[0]

    def prototypes(self, f_t: torch.Tensor, coords_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Seeds on a coarse grid of the teacher map (average-pooled features and coordinates), then soft k-means:
        f_t (B, D, *S) -> prototypes (B, K, D), coordinates (B, K, n)."""
        b, d, *spatial = f_t.shape
        n = len(spatial)
        grid = [min(g, s) for g, s in zip(
            self.proto_grid if isinstance(self.proto_grid, (list, tuple)) else [self.proto_grid] * n, spatial)]
        pool = {2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[n]
        seeds = pool(F.normalize(f_t, dim=1), grid).flatten(2).transpose(1, 2)  # (B, K, D)
        cmap = coords_t.transpose(1, 2).reshape(b, n, *spatial)  # (B, n, *S)
        seed_xyz = pool(cmap, grid).flatten(2).transpose(1, 2)  # (B, K, n)
        feats = f_t.flatten(2).transpose(1, 2)  # (B, Mt, D)
        return soft_kmeans(feats, coords_t, seeds, seed_xyz, self.kmeans_iters, self.t_teacher, self.fwhm,
                           self.z_scale)

    def forward(self, batch: dict, encoder: nn.Module, ctx: ForwardContext | None = None) -> ObjectiveOutput:
        if self.image_key not in batch:
            raise KeyError(f"cpa: the batch has no '{self.image_key}' key (keys: {sorted(batch)})")
        image = batch[self.image_key]
        views = self.make_views(image.detach().float())  # crops and resampling on the image's device
        dev = image.device
        t = views["teacher"]
        teacher = self.teacher["encoder"]
        with torch.no_grad():
            f_t = self._dense(teacher, t["input"].to(dev, next(teacher.parameters()).dtype)).float()  # (B, D, *S_t)
            t_size = tuple(f_t.shape[2:])
            coords_t = grid_coords(t["start"], t["length"], t_size).to(dev)  # (B, Mt, n)
            protos, _ = self.prototypes(f_t, coords_t)
            f_t_flat = f_t.flatten(2).transpose(1, 2)  # (B, Mt, D)
        losses, kept, embeds = [], [], None
        for name in ("student1", "student2"):
            s = views[name]
            f_s = self._dense(encoder, s["input"].to(dev, image.dtype))  # (B, D, *S_s)
            if embeds is None:
                embeds = pooled(f_s.detach().float())
            coords_s = grid_coords(s["start"], s["length"], tuple(f_s.shape[2:])).to(dev)  # (B, Ms, n)
            idx, keep = pair_nearest(coords_s, t["start"].to(dev), t["length"].to(dev), t_size, self.max_pair_dist)
            paired = f_t_flat.gather(1, idx[..., None].expand(-1, -1, f_t_flat.shape[-1]))  # (B, Ms, D)
            losses.append(cpa_cross_entropy(f_s.flatten(2).transpose(1, 2).float(), paired, keep, protos,
                                            self.t_teacher, self.t_student))
            kept.append(float(keep.float().mean()))
        loss = sum(losses) / len(losses)
        logs = {"cpa": float(loss.detach()), "cpa_pairs_kept": sum(kept) / len(kept),
                "cpa_prototypes": float(protos.shape[1])}
        return ObjectiveOutput(loss, logs, embeddings=embeds, teacher_embeddings=pooled(f_t))

    def on_optimizer_step(self, step: int, total_steps: int) -> None:
        self.teacher.update(step, total_steps)

    def log_scalars(self) -> dict[str, float]:
        return {"ema_tau": self.teacher.tau, "ema_updates": float(self.teacher.updates)}
