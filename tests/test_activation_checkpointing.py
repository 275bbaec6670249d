"""Activation checkpointing, one option for every encoder family (issue 24): `model.activation_checkpointing`,
passed through the registry; equal outputs and gradients with and without; the blocks really are recomputed."""

from __future__ import annotations

import pytest
import torch

from conftest import ENCODER_FAMILIES, tiny_encoder
from sslkit.config import config_from_dict
from sslkit.errors import ConfigError
from sslkit.models.base import empty_weights, set_activation_checkpointing
from sslkit.models.registry import build_encoder, build_segmenter, encoder_names


def _count_attention_calls(model: torch.nn.Module) -> list[int]:
    """A counter of forward calls of the model's attention modules (a checkpointed block runs them again in
    the backward pass). Pre-hooks: the recomputation stops early, once it has every tensor the backward needs,
    which can be before an attention module returns."""
    calls = [0]

    def hook(*_):
        calls[0] += 1

    for m in model.modules():
        if type(m).__name__.endswith("Attention"):
            m.register_forward_pre_hook(hook)
    return calls


def _step(family: str, checkpointing: bool):
    enc, shape = tiny_encoder(family)  # same seed, same weights
    if checkpointing:
        assert set_activation_checkpointing(enc) > 0
    enc.train()
    calls = _count_attention_calls(enc)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    out = enc(x)
    forward_calls = calls[0]
    sum(o.square().mean() for o in out).backward()
    grads = {n: p.grad for n, p in enc.named_parameters() if p.grad is not None}
    return [o.detach() for o in out], grads, forward_calls, calls[0]


@pytest.mark.parametrize("family", ENCODER_FAMILIES)
def test_checkpointing_gives_equal_gradients(family, one_thread):
    out, grads, fwd, total = _step(family, False)
    out_c, grads_c, fwd_c, total_c = _step(family, True)
    for a, b in zip(out_c, out):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert grads_c.keys() == grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads_c[name], grads[name], atol=1e-6, rtol=1e-5, msg=name)
    assert fwd > 0 and total == fwd and fwd_c == fwd
    assert total_c == 2 * fwd  # every attention ran again in the backward pass


def test_no_recompute_without_autograd(one_thread):
    enc, shape = tiny_encoder("qt_unet_2d")
    set_activation_checkpointing(enc)
    calls = _count_attention_calls(enc)
    with torch.no_grad():
        enc(torch.randn(shape))
    assert calls[0] > 0
    set_activation_checkpointing(enc, False)
    assert not any(getattr(m, "use_checkpoint", False) for m in enc.modules())


def test_every_registered_encoder_and_segmenter_takes_the_option():
    with empty_weights():
        for name in encoder_names():
            kw = {"spatial_dims": 2} if name.startswith("sam") else {}
            enc = build_encoder(name, activation_checkpointing=True, **kw)
            units = [m for m in enc.modules() if getattr(m, "use_checkpoint", None) is True]
            assert units, name
        seg = build_segmenter("qt_unet", spatial_dims=3, activation_checkpointing=True)
        assert seg.decoder.stages[0].use_checkpoint and seg.encoder.stages[0].use_checkpoint
        seg = build_segmenter("swin_unetr", spatial_dims=3, activation_checkpointing=True)
        assert all(b.use_checkpoint for b in seg.net.swinViT.layers1[0].blocks)
        assert not build_encoder("swin_unetr").swinViT.layers1[0].blocks[0].use_checkpoint


def test_config_key():
    cfg = config_from_dict({"model": {"activation_checkpointing": True}})
    assert cfg.model.activation_checkpointing is True
    assert config_from_dict({}).model.activation_checkpointing is False
    with pytest.raises(ConfigError, match="activation_checkpointing"):
        config_from_dict({"model": {"activation_checkpoint": True}})
