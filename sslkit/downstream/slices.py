"""2D models on 3D scans (AutoSAM / MSA practice, `data.slices: true`).

Volumes are pre-processed in 3D exactly as for a 3D model (orientation RAS, in-plane spacing, per-volume
z-score with `mri_norm: volume`), then
  training    every axial (last-axis) slice of every training volume is one sample: (C, H, W) image and
              (1, H, W) label, padded / randomly cropped to the 2D `roi`, flipped / rotated / intensity-jittered;
              `slice_channels: 3` repeats the slice to 3 channels (SAM's RGB input);
  inference   the slices of a volume go through the 2D model as one batch (2D sliding window of `roi`) and the
              logits are stacked back into (B, K, H, W, D), so Dice / HD95 are computed on the 3D volume.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset


def repeat_channels(x: torch.Tensor, times: int, dim: int) -> torch.Tensor:
    return x if times == 1 else torch.cat([x] * times, dim=dim)


class SliceDataset(Dataset):
    """Axial slices of pre-processed volumes: item i -> {"image": (C * channels, h, w), "label": (1, h, w)}.
    `transform` is the random 2D part (the fine-tuning loop re-seeds it per epoch)."""

    def __init__(self, volumes: Dataset, channels: int, transform):
        self.volumes = volumes
        self.channels = channels
        self.transform = transform
        self.index = [(v, z) for v in range(len(volumes)) for z in range(volumes[v]["image"].shape[-1])]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        v, z = self.index[i]
        vol = self.volumes[v]  # the cached volume itself (not a copy): only its slice z is copied out
        item = {"image": repeat_channels(vol["image"][..., z].clone(), self.channels, 0),
                "label": vol["label"][..., z].clone()}
        return self.transform(item)


@torch.no_grad()
def infer_by_slices(model, image: torch.Tensor, cfg, device, chunk: int = 32) -> torch.Tensor:
    """(B, C, H, W, D) volume -> (B, K, H, W, D) logits of a 2D model run on its axial slices (2D sliding window
    of data.roi), `chunk` slices at a time."""
    from monai.inferers import sliding_window_inference

    t = cfg.train
    b, depth = image.shape[0], image.shape[-1]
    slices = repeat_channels(image.permute(0, 4, 1, 2, 3).flatten(0, 1), cfg.data.slice_channels, 1)
    out = []
    for s in range(0, slices.shape[0], chunk):
        part = slices[s:s + chunk].to(device)
        out.append(sliding_window_inference(part, list(cfg.data.roi), t.sw_batch_size, model,
                                            overlap=t.sw_overlap, mode=t.sw_mode).cpu())
    logits = torch.cat(out)  # (B D, K, H, W)
    return logits.unflatten(0, (b, depth)).permute(0, 2, 3, 4, 1)
