"""The Swin-UNETR encoder wrapper equals MONAI's SwinTransformer, in 2D and 3D, through both code paths."""

from __future__ import annotations

import pytest
import torch

from sslkit.models import build_encoder


@pytest.mark.parametrize("dims, size", [(3, (32, 32, 32)), (2, (64, 64))])
def test_matches_monai_and_token_hooks(dims, size):
    torch.manual_seed(0)
    enc = build_encoder("swin_unetr", spatial_dims=dims, in_channels=1, feature_size=12, depths=[1, 1, 1, 1])
    x = torch.randn(2, 1, *size)
    ours = enc(x)
    reference = enc.swinViT(x, normalize=True)  # MONAI's own forward over the same weights
    assert len(ours) == 5 and all(torch.equal(a, b) for a, b in zip(ours, reference))
    assert [o.shape[1] for o in ours] == enc.feature_channels == [12, 24, 48, 96, 192]
    assert ours[-1].shape[2:] == tuple(s // 32 for s in size)
    tokens = enc.embed(x)
    assert tokens.shape == (2, 12, *(s // 2 for s in size))
    assert all(torch.equal(a, b) for a, b in zip(enc.forward_tokens(tokens), ours))


def test_segmenter_shares_encoder_weights():
    from sslkit.models import build_segmenter

    seg = build_segmenter("swin_unetr", spatial_dims=3, in_channels=1, out_channels=3, feature_size=12)
    assert seg.encoder.swinViT is seg.net.swinViT
    assert seg(torch.randn(1, 1, 64, 64, 64)).shape == (1, 3, 64, 64, 64)  # 64: instance norm needs >1 voxel at /32
