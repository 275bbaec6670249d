"""Encoder weights in and out of other toolkits' formats (MONAI, research-contributions, VoCo, SAM, timm, Hugging Face).

Weights in -- `load_pretrained_state(path, encoder) -> (state_dict, description)`; `load_pretrained(encoder, path)`
    loads it (strict) and returns the description; `from_pretrained(path)` builds the encoder from a file's plan.
    Reads a LOCAL file: safetensors, or `torch.load(weights_only=True)` (never unpickles Python objects). A checkpoint
    dict may wrap the weights under one of WRAPPER_KEYS ("state_dict", "model", "net", "teacher", ...). The encoder's
    tensors are found by an anchor key (the patch embedding) wherever they are nested, renamed to the encoder's keys,
    and checked strictly (missing / unexpected / mis-shaped keys are one UserError line). Layouts understood, with the
    source each was learned from:

    sslkit             safetensors with an `sslkit.plan` (encoder.safetensors, model.safetensors, a checkpoint's
                       student/teacher.safetensors, where the encoder sits under "encoder."), or a plain state dict
                       with the encoder's own keys.
    MONAI SwinUNETR    `monai.networks.nets.SwinUNETR(...).state_dict()`: `swinViT.*` (= our keys) beside
                       encoder1-4/10, decoder1-5 and out (dropped).
    research-contributions SSL
                       `model_swinvit.pt` of Project-MONAI/research-contributions SwinUNETR/Pretrain, the file
                       `SwinUNETR.load_from` reads (MONAI swin_unetr.py):
                       {"state_dict": {"module.patch_embed.proj.{weight,bias}",
                                       "module.layers{1-4}.0.blocks.{j}.{norm1,attn.relative_position_bias_table,
                                        attn.relative_position_index,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*",
                                       "module.layers{i}.0.downsample.{reduction.weight,norm.weight,norm.bias}",
                                       + SSL heads module.{norm,convTrans3d,rotation_head,contrastive_head}.*}}
                       `mlp.fc1/fc2` are MONAI's `mlp.linear1/linear2`; the SSL heads are dropped (the same list as
                       MONAI's `filter_swinunetr`). Also accepted without "module.", and SSLHead training checkpoints
                       (`swinViT.`/`swin_vit.` beside `rotation_head`, `contrastive_head`, `conv`).
    VoCo               Luffy03/VoCo and Luffy03/Large-Scale-Medical: the released VoCo_10k.pt and
                       VoCo_{B,L,H}_SSL_head.pt are SwinUNETR(use_v2=True) state dicts -- `swinViT.*` including the
                       v2 `layers{i}c` blocks, plus `encoder{1,2,3,4,10}` -- bare or under "state_dict", with or
                       without "module." and with `swin_vit` for `swinViT` (what their README loader strips); VoCoHead
                       pretraining checkpoints nest `student.` and `teacher.` Swin-UNETRs beside `proj_head`. When a
                       file holds both branches the teacher (EMA) one is taken. The encoder must be built with
                       `use_v2: true` for these.
    SAM                official `sam_vit_{b,l,h}_*.pth` and SAM-derived files (MedSAM; SAM-Med2D without encoder
                       adapters): `image_encoder.*` with `mlp.lin1/lin2`, under any "module."/"model." prefix; prompt
                       encoder and mask decoder dropped; pos_embed and relative-position tables interpolated to the
                       encoder's image size (`sslkit.models.sam.sam_state_dict`).
    timm samvit        `timm.create_model("samvit_*").state_dict()`: already our keys; a classifier `head.*` is dropped.

Weights out -- `export_weights(encoder, plan, out, fmt, health=None) -> [paths written]`, fmt in EXPORT_FORMATS:
    monai              Swin-UNETR encoders: `swinViT.*` tensors (= MONAI SwinUNETR keys) as a torch file of plain
                       tensors (`.pt`/`.pth`) or safetensors (`.safetensors`, plan in metadata);
                       `SwinUNETR(**args, out_channels=K).load_state_dict(sd, strict=False)` leaves no swinViT key
                       missing. A sidecar `<out>.json` holds the SwinUNETR arguments (`monai_swinunetr_args`).
    monai_load_from    the research-contributions layout above (`{"state_dict": {"module....": ...}}`, mlp.fc1/fc2,
                       plus "sslkit_plan" as a JSON string), which `SwinUNETR.load_from(torch.load(out))` reads.
                       SwinUNETR-v2 encoders are refused: load_from does not read the `layers{i}c` blocks.
    timm               SAM ViT encoders without adapters: timm `samvit_*` keys (= ours); load with
                       `timm.create_model(name, pretrained=False, **kwargs)` from `timm_model_args(encoder)` (also in
                       the sidecar `<out>.json`) and `load_state_dict(sd, strict=True)`. timm takes the normalised
                       3-channel image: `timm_model.forward_features(encoder.normalize(x)) == encoder(x)[-1]`.
    hf                 a folder: `config.json` (the plan), `model.safetensors` (our keys, plan in metadata) and a
                       `README.md` model card; `from_pretrained(folder)` rebuilds the encoder from it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from sslkit.errors import UserError

EXPORT_FORMATS = ("monai", "monai_load_from", "timm", "hf")
# Keys under which checkpoint dicts keep their weights, in the order they are tried (the EMA teacher first).
WRAPPER_KEYS = ("state_dict", "model", "net", "network", "teacher", "student", "module", "encoder", "weights",
                "params", "model_state_dict")
# research-contributions SSLHead parts that sit beside the Swin transformer (MONAI filter_swinunetr's list + SSLHead).
SWIN_SSL_HEADS = ("norm", "convTrans3d", "rotation_head", "rotation_pre", "contrastive_head", "contrastive_pre",
                  "conv")
SAM_HEADS = ("head",)
SWIN_UNETR_DECODER = ("decoder1", "decoder2", "decoder3", "decoder4", "decoder5", "out")
# Substrings typical of each supported layout, used only to name the closest one in an error.
LAYOUT_SIGNATURES = {
    "research-contributions SSL (model_swinvit.pt)": ("convTrans3d", "rotation_head", "contrastive_head",
                                                      "layers1.0.blocks"),
    "MONAI SwinUNETR": ("swinViT.", "encoder10.", "decoder1."),
    "VoCo Swin-UNETR": ("swin_vit.", "proj_head.", "layers1c.", "student.", "teacher."),
    "official SAM (image_encoder.*)": ("image_encoder.", "prompt_encoder.", "mask_decoder.", "mlp.lin1"),
    "timm samvit": ("neck.0.", "rel_pos_h", "blocks.0.attn.qkv"),
}


# ================================================================================================ reading files


def _few(items, n: int = 4) -> str:
    items = list(items)
    return ", ".join(str(i) for i in items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def _is_safetensors(path: Path) -> bool:
    """Safetensors header sniff: 8-byte little-endian header length, then a JSON object."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < (1 << 32)


def _find_state(obj, where: str = "") -> tuple[dict[str, torch.Tensor], str] | None:
    """The state dict inside a loaded checkpoint: the dict itself when at least half its entries are tensors, else
    the first WRAPPER_KEYS entry that holds one (recursively); None when there is none.
    Returns (tensors, where) with where e.g. "['state_dict']"."""
    if not isinstance(obj, dict):
        return None
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if tensors and 2 * len(tensors) >= len(obj):
        return tensors, where
    for key in WRAPPER_KEYS:
        found = _find_state(obj.get(key), f"{where}['{key}']")
        if found:
            return found
    return None


def _unwrap(obj, path: Path) -> tuple[dict[str, torch.Tensor], str]:
    found = _find_state(obj)
    if found is None:
        kind = f"a dict with keys {_few(map(str, obj), 6)}" if isinstance(obj, dict) else f"a {type(obj).__name__}"
        raise UserError(f"{path}: holds no state dict of tensors ({kind}; looked under "
                        f"{', '.join(WRAPPER_KEYS[:6])} ...)")
    return found


def read_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict | None, str]:
    """(tensors, plan or None, where) of a local weights file, a checkpoint directory or a run / HF folder.

    `where` names the wrapper that held the tensors ("" at the top level, "['state_dict']" ...)."""
    from sslkit.plan import read_weights, weights_file

    p = Path(path)
    if p.is_dir():
        p = weights_file(p)
    if not p.is_file():
        raise UserError(f"{p}: no such weights file")
    if p.suffix == ".safetensors" or _is_safetensors(p):
        tensors, plan = read_weights(p)
        return tensors, plan, ""
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - corrupt, truncated, or pickled Python objects
        first = str(e).splitlines()[0][:120] if str(e) else ""
        raise UserError(f"{p}: cannot be read as safetensors or a weights-only torch file ({type(e).__name__}: "
                        f"{first})") from None
    tensors, where = _unwrap(obj, p)
    plan = None
    if isinstance(obj, dict) and isinstance(obj.get("sslkit_plan"), str):
        try:
            plan = json.loads(obj["sslkit_plan"])
        except json.JSONDecodeError:
            raise UserError(f"{p}: its 'sslkit_plan' entry is not valid JSON") from None
    return tensors, plan, where


# ============================================================================================== key layouts


def swin_key_to_ours(rel: str) -> str:
    """A MONAI SwinTransformer key (research-contributions spelling allowed) -> our `swinViT.*` key:
    `...mlp.fc1.*` / `...mlp.fc2.*` (pre-release MONAI, model_swinvit.pt) are `mlp.linear1` / `mlp.linear2`."""
    return "swinViT." + rel.replace(".mlp.fc1.", ".mlp.linear1.").replace(".mlp.fc2.", ".mlp.linear2.")


def sam_key_to_ours(rel: str) -> str:
    """An official SAM image-encoder key (relative to `image_encoder.`) or a timm samvit key -> ours (timm names)."""
    return rel.replace(".mlp.lin1.", ".mlp.fc1.").replace(".mlp.lin2.", ".mlp.fc2.")


@dataclass(frozen=True)
class _Family:
    """How one encoder family's tensors are found in a file: `anchor` is the file-key suffix at the encoder's root,
    `to_ours` maps a key relative to that root to the encoder's key, `heads` are first key components under the
    root that belong to other models' heads (dropped)."""

    kind: str
    anchor: str
    to_ours: Callable[[str], str]
    heads: tuple[str, ...] = ()
    target: str = ""


def _family(encoder: nn.Module) -> _Family:
    from sslkit.models.sam import SAMImageEncoder
    from sslkit.models.swin_unetr import SwinUNETREncoder

    if isinstance(encoder, SwinUNETREncoder):
        return _Family("swin", "patch_embed.proj.weight", swin_key_to_ours, SWIN_SSL_HEADS, "swinViT.*")
    if isinstance(encoder, SAMImageEncoder):
        return _Family("sam", "patch_embed.proj.weight", sam_key_to_ours, SAM_HEADS, "the SAM ViT encoder")
    anchor = next(iter(encoder.state_dict()))
    return _Family("generic", anchor, lambda rel: rel, (), type(encoder).__name__)


@dataclass
class _Match:
    """The encoder found under one root of a file."""

    root: str
    mapped: dict[str, torch.Tensor] = field(default_factory=dict)  # our key -> tensor
    unmatched: list[str] = field(default_factory=list)  # file keys under the root that name no encoder tensor
    heads: list[str] = field(default_factory=list)  # file keys under the root that are known heads (dropped)
    others: list[str] = field(default_factory=list)  # file keys outside the root: other parts of the model (dropped)
    coverage: float = 0.0  # share of the encoder's required tensors found


def _branch_rank(root: str) -> int:
    """Teacher (EMA) branch before an unnamed one before a student branch."""
    if re.search(r"(^|\.)teacher\.", root):
        return 0
    return 2 if re.search(r"(^|\.)student\.", root) else 1


def _matches(tensors: dict[str, torch.Tensor], fam: _Family, own: dict, required: set[str]) -> list[_Match]:
    """Every root at which the family's anchor occurs, best first (coverage, fewest unmatched, teacher first,
    shortest root). A key under a deeper root belongs to that root, not to the shallower one."""
    a = fam.anchor
    roots = sorted({k[: len(k) - len(a)] for k in tensors
                    if k.endswith(a) and (len(k) == len(a) or k[len(k) - len(a) - 1] == ".")})
    out = []
    for root in roots:
        deeper = [r for r in roots if r != root and r.startswith(root)]
        m = _Match(root)
        for k, v in tensors.items():
            if not k.startswith(root) or any(k.startswith(d) for d in deeper):
                m.others.append(k)
                continue
            rel = k[len(root):]
            ours = fam.to_ours(rel)
            if ours in own:
                m.mapped[ours] = v
            elif rel.split(".")[0] in fam.heads:
                m.heads.append(k)
            else:
                m.unmatched.append(k)
        m.coverage = len(required & m.mapped.keys()) / max(len(required), 1)
        out.append(m)
    return sorted(out, key=lambda m: (-m.coverage, len(m.unmatched), _branch_rank(m.root), len(m.root), m.root))


def _top_names(keys, strip: str = "") -> list[str]:
    return sorted({k[len(strip):].split(".")[0] for k in keys if k.startswith(strip)})


def _sibling_names(keys, root: str) -> list[str]:
    """Names of the parts beside the encoder root: for each key, the first component where it leaves the root
    (root "module.teacher.swinViT.": "module.student.x" -> student, "module.teacher.encoder1.x" -> encoder1)."""
    rc = root.split(".")[:-1]
    names = set()
    for k in keys:
        kc = k.split(".")
        i = 0
        while i < min(len(rc), len(kc) - 1) and kc[i] == rc[i]:
            i += 1
        names.add(kc[i])
    return sorted(names)


def _layout_name(fam: _Family, m: _Match, plan: dict | None) -> str:
    """A human name for the layout a match came from (see the module docstring for the layouts)."""
    if plan is not None:
        enc = plan.get("encoder", {})
        return (f"sslkit encoder file (plan: {enc.get('name', '?')}, {plan.get('spatial_dims', '?')}-D, "
                f"{plan.get('in_channels', '?')} channel(s))")
    root = m.root
    if fam.kind == "swin":
        tail = next((t for t in ("swinViT.", "swin_vit.") if root.endswith(t)), "")
        nested = bool(tail)
        outer = root[: len(root) - len(tail)]
        parts = set(_top_names(m.others, outer))
        branch = _branch_rank(outer)
        if not nested:
            base, quals = "MONAI Swin-UNETR SSL checkpoint", ["research-contributions format"]
        elif branch != 1:
            base, quals = "VoCo pretraining checkpoint", ["teacher branch" if branch == 0 else "student branch"]
        elif parts & {"rotation_head", "contrastive_head", "conv"}:
            base, quals = "research-contributions SSLHead training checkpoint", []
        elif "proj_head" in parts or ("encoder10" in parts and not parts & set(SWIN_UNETR_DECODER)):
            base, quals = "VoCo Swin-UNETR checkpoint", ["encoder-only SwinUNETR layout"]
        elif parts & set(SWIN_UNETR_DECODER):
            base, quals = "MONAI SwinUNETR state dict", []
        else:
            base, quals = "Swin-UNETR encoder state dict", ["sslkit / MONAI swinViT.* keys"]
        if outer:
            quals.append(f"'{outer}' prefix")
        if root.endswith("swin_vit."):
            quals.append("'swin_vit' spelling")
        return base + (f" ({', '.join(quals)})" if quals else "")
    if fam.kind == "sam":
        if root.endswith("image_encoder."):
            outer = root[: -len("image_encoder.")]
            return ("SAM checkpoint (official image_encoder.* layout"
                    + (f", '{outer}' prefix as in MedSAM / SAM-Med2D files)" if outer else ")"))
        return "timm samvit / sslkit SAM state dict" + (f" ('{root}' prefix)" if root else "")
    return "encoder state dict with this encoder's keys" + (f" ('{root}' prefix)" if root else "")


def _closest_layout(keys: list[str]) -> str:
    """The supported layout whose typical key fragments occur in the most file keys (for error messages)."""
    best, share = "", 0.0
    for name, sigs in LAYOUT_SIGNATURES.items():
        s = sum(any(sig in k for sig in sigs) for k in keys) / max(len(keys), 1)
        if s > share:
            best, share = name, s
    return f"{best} ({share:.0%} of its keys look like it)" if best else \
        "none of sslkit, MONAI SwinUNETR, research-contributions SSL, VoCo, SAM, timm samvit"


def _mismatch_hint(fam: _Family, encoder: nn.Module, missing, unexpected, shapes: dict) -> str:
    hints = []
    if fam.kind == "swin":
        v2 = bool(getattr(encoder.swinViT, "use_v2", False))
        if not v2 and any("layers1c." in k for k in unexpected):
            hints.append("the file is SwinUNETR-v2 (VoCo): build the encoder with use_v2: true")
        if v2 and any("layers1c." in k for k in missing):
            hints.append("the file is SwinUNETR-v1: build the encoder with use_v2: false")
        if any(".blocks." in k for k in unexpected) or any(".blocks." in k for k in missing):
            hints.append("the stage depths differ")
        if any("relative_position" in k for k in shapes):
            hints.append("the window size differs")
    if fam.kind == "sam" and any("adapter" in k.lower() for k in unexpected):
        hints.append("the file's encoder adapters (e.g. SAM-Med2D's) have no place in this encoder")
    pe = next((k for k in shapes if k.endswith("patch_embed.proj.weight")), None)
    if pe:
        f, e = shapes[pe]
        if f[0] != e[0]:
            hints.append(f"embedding width {f[0]} in the file vs {e[0]} in the encoder")
        elif len(f) > 1 and f[1] != e[1]:
            hints.append(f"{f[1]} input channel(s) in the file vs {e[1]} in the encoder")
    return f" ({'; '.join(hints)})" if hints else ""


def load_pretrained_state(path: str | Path, encoder: nn.Module) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict ready for `encoder.load_state_dict(sd, strict=True)`, one-line description of what was read).

    Example: "MONAI Swin-UNETR SSL checkpoint (research-contributions format, 'module.' prefix) under
    ['state_dict']: 158 tensors mapped to swinViT.*; dropped 8 head tensors (contrastive_head, convTrans3d, ...)".
    Encoder tensors the file cannot have (adapters added for fine-tuning: names containing 'adapter' or listed in
    `encoder.added_keys`) keep the encoder's current values. UserError (one line) for an unknown layout or any
    missing / unexpected / mis-shaped tensor."""
    tensors, plan, where = read_tensors(path)
    return _fit(tensors, plan, where, path, encoder)


def _fit(tensors: dict, plan: dict | None, where: str, path, encoder: nn.Module) -> tuple[dict, str]:
    """load_pretrained_state on tensors already read."""
    fam = _family(encoder)
    own = encoder.state_dict()
    optional = set(getattr(encoder, "added_keys", set())) | {k for k in own if "adapter" in k}
    required = set(own) - optional
    matches = _matches(tensors, fam, own, required)
    best = matches[0] if matches else None
    if best is None or best.coverage < 0.5:
        raise _unknown_layout(path, tensors, encoder, best)
    name = _layout_name(fam, best, plan)
    state, note = _fit_sam_grid(best.mapped, encoder) if fam.kind == "sam" else (dict(best.mapped), "")
    missing = sorted(required - set(state))
    shapes = {k: (tuple(v.shape), tuple(own[k].shape)) for k, v in state.items() if v.shape != own[k].shape}
    if missing or best.unmatched or shapes:
        raise _mismatch(path, name, fam, encoder, missing, sorted(best.unmatched), shapes)
    kept = sorted(optional - set(state))
    state.update({k: own[k] for k in kept})
    return state, _description(name, where, fam, best, kept) + note


def _unknown_layout(path, tensors: dict, encoder: nn.Module, best: _Match | None) -> UserError:
    found = f"; best root '{best.root}' holds {best.coverage:.0%} of the encoder's tensors" if best else ""
    unknown = best.unmatched + best.others if best else list(tensors)
    return UserError(f"{path}: not a known weights layout for {type(encoder).__name__} ({len(tensors)} tensors; "
                     f"closest: {_closest_layout(list(tensors))}{found}); unmatched file keys: {_few(unknown)}; "
                     f"the encoder expects e.g. {_few(list(encoder.state_dict()), 2)}")


def _mismatch(path, name: str, fam: _Family, encoder: nn.Module, missing: list, unexpected: list,
              shapes: dict) -> UserError:
    parts = []
    if missing:
        parts.append(f"missing {len(missing)}: {_few(missing)}")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)}: {_few(unexpected)}")
    if shapes:
        parts.append(f"shape mismatch {len(shapes)}: "
                     + _few([f"{k} {f} vs {e}" for k, (f, e) in sorted(shapes.items())], 3))
    hint = _mismatch_hint(fam, encoder, missing, unexpected, shapes)
    return UserError(f"{path}: {name} does not fit {type(encoder).__name__}: " + "; ".join(parts) + hint)


def _description(name: str, where: str, fam: _Family, m: _Match, kept: list) -> str:
    desc = f"{name}{' under ' + where if where else ''}: {len(m.mapped)} tensors mapped to {fam.target}"
    if m.heads:
        desc += f"; dropped {len(m.heads)} head tensors ({_few(_top_names(m.heads, m.root), 4)})"
    if m.others:
        desc += f"; dropped {len(m.others)} tensors of other parts ({_few(_sibling_names(m.others, m.root), 4)})"
    if kept:
        desc += f"; {len(kept)} adapter tensors keep the encoder's values"
    return desc


def _fit_sam_grid(state: dict, encoder) -> tuple[dict, str]:
    """pos_embed and relative-position tables resampled to the encoder's token grid (SAM / timm do the same)."""
    from sslkit.models.sam import sam_state_dict

    before = state.get("pos_embed")
    out = sam_state_dict(state, encoder)
    after = out.get("pos_embed")
    if before is None or after is None or before.shape == after.shape:
        return out, ""
    return out, f"; pos_embed resampled {before.shape[1]}x{before.shape[2]} -> {after.shape[1]}x{after.shape[2]}"


def load_pretrained(encoder: nn.Module, path: str | Path) -> str:
    """Load a file of any supported layout into `encoder` (strict); returns the one-line description."""
    state, desc = load_pretrained_state(path, encoder)
    encoder.load_state_dict(state, strict=True)
    return desc


# ============================================================================================== weights out


def _plain_state(encoder: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of the encoder's tensors (no shared storage, so safetensors accepts them)."""
    return {k: v.detach().to("cpu").clone().contiguous() for k, v in encoder.state_dict().items()}


def monai_swinunetr_args(encoder: nn.Module) -> dict:
    """Keyword arguments of `monai.networks.nets.SwinUNETR` (all but out_channels) whose `swinViT` has exactly this
    encoder's architecture, read from the module itself."""
    from sslkit.models.swin_unetr import SwinUNETREncoder

    if not isinstance(encoder, SwinUNETREncoder):
        raise UserError(f"monai export: needs a swin_unetr encoder, got {type(encoder).__name__}")
    vit = encoder.swinViT
    stages = [getattr(vit, f"layers{i}")[0] for i in range(1, len(encoder.feature_channels))]
    return {"in_channels": int(vit.patch_embed.proj.in_channels), "feature_size": int(vit.embed_dim),
            "depths": [len(s.blocks) for s in stages], "num_heads": [int(s.blocks[0].attn.num_heads) for s in stages],
            "window_size": [int(w) for w in vit.window_size], "patch_size": int(vit.patch_size[0]),
            "spatial_dims": int(encoder.spatial_dims), "use_v2": bool(vit.use_v2)}


def timm_model_args(encoder: nn.Module) -> tuple[str, dict]:
    """(timm model name, kwargs) such that `timm.create_model(name, pretrained=False, **kwargs)` has exactly this SAM
    encoder's parameters. `norm_layer=None` makes timm use LayerNorm(eps=1e-6) as SAM does (timm's samvit default is
    eps 1e-5); `num_classes=0` drops the classifier; `in_chans=3` (our grey input is replicated before the patch
    embedding)."""
    from sslkit.models.sam import SAM_SIZES, SAMImageEncoder

    if not isinstance(encoder, SAMImageEncoder):
        raise UserError(f"timm export: needs a SAM ViT encoder (sam_vit*), got {type(encoder).__name__}")
    blk = encoder.blocks[0]
    d, depth, heads = encoder.embed_dim, len(encoder.blocks), int(blk.attn.num_heads)
    names = {"b": "samvit_base_patch16", "l": "samvit_large_patch16", "h": "samvit_huge_patch16"}
    name = next((names[s] for s, (sd, sdep, sh, _) in SAM_SIZES.items() if (sd, sdep, sh) == (d, depth, heads)),
                "samvit_base_patch16")
    kwargs = {"img_size": int(encoder.img_size), "patch_size": int(encoder.patch_size), "in_chans": 3,
              "embed_dim": int(d), "depth": depth, "num_heads": heads,
              "mlp_ratio": blk.mlp.fc1.out_features / d, "global_attn_indexes": list(encoder.global_attn_indexes),
              "window_size": int(encoder.window_size), "use_rel_pos": True,
              "neck_chans": int(encoder.neck[0].out_channels), "num_classes": 0, "norm_layer": None}
    return name, kwargs


def _save_tensors(path: Path, tensors: dict, plan: dict | None, metadata: dict[str, str]) -> Path:
    """safetensors for a `.safetensors` name (plan + metadata in the header), else a torch file of plain tensors."""
    from sslkit.plan import write_weights
    from sslkit.run import atomic_path

    if path.suffix == ".safetensors":
        return write_weights(path, tensors, plan, metadata)
    with atomic_path(path) as tmp:
        torch.save(tensors, str(tmp))
    return path


def _sidecar(path: Path, obj: dict) -> Path:
    from sslkit.run import atomic_write_json

    return atomic_write_json(path.with_suffix(".json"), obj, indent=2)


def _export_monai(encoder, plan, out: Path) -> list[Path]:
    args = monai_swinunetr_args(encoder)
    tensors = _plain_state(encoder)
    bad = [k for k in tensors if not k.startswith("swinViT.")]
    if bad:
        raise UserError(f"monai export: encoder tensors outside swinViT.* ({_few(bad)}) have no MONAI place")
    meta = {"monai.SwinUNETR": json.dumps(args, sort_keys=True)}
    written = [_save_tensors(out, tensors, plan, meta)]
    written.append(_sidecar(out, {"format": "monai", "SwinUNETR": args, "plan": plan,
                                  "load": "SwinUNETR(**SwinUNETR, out_channels=K).load_state_dict(sd, strict=False)"}))
    return written


def research_contributions_state(encoder: nn.Module) -> dict[str, torch.Tensor]:
    """The encoder's tensors in the research-contributions SSL layout read by `SwinUNETR.load_from`
    (`module.` + SwinTransformer key, `mlp.linear1/2` spelled `mlp.fc1/fc2`)."""
    out = {}
    for k, v in _plain_state(encoder).items():
        rel = k[len("swinViT."):]
        out["module." + rel.replace(".mlp.linear1.", ".mlp.fc1.").replace(".mlp.linear2.", ".mlp.fc2.")] = v
    return out


def _export_monai_load_from(encoder, plan, out: Path) -> list[Path]:
    from sslkit.run import atomic_path

    args = monai_swinunetr_args(encoder)
    if args["use_v2"]:
        raise UserError("monai_load_from export: SwinUNETR.load_from does not read the v2 layers{i}c blocks of this "
                        "use_v2 encoder; export with --format monai instead")
    if out.suffix == ".safetensors":
        raise UserError(f"{out}: SwinUNETR.load_from reads a torch file ({{'state_dict': ...}}); name it .pt")
    payload = {"state_dict": research_contributions_state(encoder)}
    if plan is not None:
        payload["sslkit_plan"] = json.dumps(plan, sort_keys=True)
    with atomic_path(out) as tmp:
        torch.save(payload, str(tmp))
    return [out, _sidecar(out, {"format": "monai_load_from", "SwinUNETR": args, "plan": plan,
                                "load": "SwinUNETR(**SwinUNETR, out_channels=K).load_from(torch.load(path))"})]


def _export_timm(encoder, plan, out: Path) -> list[Path]:
    name, kwargs = timm_model_args(encoder)
    adapters = [k for k in encoder.state_dict() if "adapter" in k]
    if adapters:
        raise UserError(f"timm export: this SAM encoder has {len(adapters)} Medical SAM Adapter tensors, which timm's "
                        f"samvit has no place for; export with --format hf to keep them")
    meta = {"timm.model_name": name, "timm.kwargs": json.dumps(kwargs, sort_keys=True)}
    written = [_save_tensors(out, _plain_state(encoder), plan, meta)]
    written.append(_sidecar(out, {
        "format": "timm", "model_name": name, "kwargs": kwargs, "plan": plan,
        "input": "timm takes the normalised 3-channel image: SAM mean/std on 0-255 values (sslkit input_range "
                 f"'{encoder.input_range}'); forward_features(x) is the encoder's neck output",
        "load": "timm.create_model(model_name, pretrained=False, **kwargs).load_state_dict(sd, strict=True)"}))
    return written


def _training_lines(plan: dict) -> list[str]:
    recipe, corpus, source = plan.get("recipe") or {}, plan.get("corpus") or {}, plan.get("source") or {}
    line = f"- recipe: {recipe.get('name', 'not recorded')}"
    if recipe.get("sha256"):
        line += f" (`{recipe.get('path')}`, sha256 `{recipe['sha256'][:16]}...`)"
    mods = ", ".join(f"{m}: {n}" for m, n in sorted((corpus.get("modalities") or {}).items()))
    scans = f"- corpus: {corpus.get('scans', '?')} scans" + (f" ({mods})" if mods else "") if corpus else \
        "- corpus: not recorded"
    steps = f"- optimizer steps: {source.get('step', 'not recorded')}"
    if source.get("run_dir"):
        steps += f" ({source.get('kind', 'pretrain')} run `{source['run_dir']}`)"
    return [line, scans, steps]


def _input_lines(plan: dict) -> list[str]:
    enc = plan.get("encoder", {})
    return [f"- encoder arguments: `{json.dumps(enc.get('args', {}), sort_keys=True)}`",
            f"- orientation {plan.get('orientation')}, spacing {plan.get('spacing')} mm, modality "
            f"{plan.get('modality')}, axis order {plan.get('axis_order')}",
            f"- intensity: `{json.dumps(plan.get('intensity', {}), sort_keys=True)}`",
            f"- foreground crop {plan.get('crop_foreground')}, crop size {plan.get('crop_size')}",
            f"- features: channels {plan.get('feature_channels')}, strides {plan.get('feature_strides')}"]


def _health_lines(health: dict | None) -> list[str]:
    if not health:
        return ["No monitor figures were given at export."]
    rows = [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in sorted(health.items())]
    return ["| figure | value |", "|---|---|", *rows]


def _probe_lines(probe: dict) -> list[str]:
    """The plan's task-probe record (sslkit.monitor.task_probe.probe_record) as a table."""
    rows = [("last", probe.get("last")), ("best", probe.get("best"))]
    lines = ["| probe | step | mean Dice |", "|---|---|---|"]
    lines += [f"| {name} | {r['step']} | {r['dice_mean']:.4f} |" for name, r in rows if r]
    lines += [f"| reference: {name} | 0 | {v:.4f} |" for name, v in probe.get("references", {}).items()]
    return lines


def model_card(plan: dict, health: dict | None = None) -> str:
    """README.md for a Hugging Face folder: what the encoder is, the recipe / corpus / steps it came from (the plan's
    "recipe", "corpus", "source"), its input (the plan), the monitor's last health figures, and how to load it."""
    name = plan.get("encoder", {}).get("name", "encoder")
    header = ["---", "library_name: sslkit", "tags:", "- medical-imaging", "- self-supervised-learning", f"- {name}",
              "---", "", f"# {name} encoder pretrained with sslkit", "",
              f"Self-supervised {plan.get('spatial_dims', '?')}-D encoder `{name}` ({plan.get('in_channels', '?')} "
              f"input channel(s)), exported by sslkit {plan.get('sslkit_version', '?')}."]
    use = ["```python", "import sslkit", "", 'encoder = sslkit.from_pretrained("path/to/this/folder")',
           "features = encoder(x)  # list of stage maps, shallow -> deep", "```", "",
           "`model.safetensors` holds the encoder's state dict with this plan in its metadata (`sslkit.plan`); "
           "`config.json` is the same plan."]
    sections = [("Training", _training_lines(plan)), ("Input (the plan)", _input_lines(plan)),
                ("Health at export (collapse monitor)", _health_lines(health))]
    if plan.get("task_probe"):
        sections.append(("Task probe (voxel classifier on frozen features)", _probe_lines(plan["task_probe"])))
    sections.append(("Use", use))
    lines = header
    for title, body in sections:
        lines += ["", f"## {title}", "", *body]
    return "\n".join(lines) + "\n"


def _export_hf(encoder, plan, out: Path, health: dict | None) -> list[Path]:
    from sslkit.plan import write_weights
    from sslkit.run import atomic_write_json, atomic_write_text

    if plan is None:
        raise UserError("hf export: needs the encoder's plan (the folder's config.json)")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: hf export writes a folder, and this is a file")
    out.mkdir(parents=True, exist_ok=True)
    return [atomic_write_json(out / "config.json", plan, indent=2),
            write_weights(out / "model.safetensors", _plain_state(encoder), plan),
            atomic_write_text(out / "README.md", model_card(plan, health))]


def export_weights(encoder: nn.Module, plan: dict | None, out: str | Path, fmt: str,
                   health: dict | None = None) -> list[Path]:
    """Write the encoder's weights for another toolkit (see the module docstring); returns the paths written."""
    out = Path(out)
    if fmt == "monai":
        return _export_monai(encoder, plan, out)
    if fmt == "monai_load_from":
        return _export_monai_load_from(encoder, plan, out)
    if fmt == "timm":
        return _export_timm(encoder, plan, out)
    if fmt == "hf":
        return _export_hf(encoder, plan, out, health)
    raise UserError(f"export format '{fmt}' is not one of {', '.join(EXPORT_FORMATS)}")


# ============================================================================================ from_pretrained


def from_pretrained(path: str | Path):
    """The encoder a plan-carrying file or folder describes, with its weights loaded strictly, in eval mode.

    `path`: an HF folder from `export_weights(..., "hf")`, a `.safetensors` file with an sslkit plan, a pretraining
    run directory or checkpoint directory. The plan is kept on the returned encoder as `encoder.plan`."""
    from sslkit.models.registry import build_encoder
    from sslkit.plan import weights_file

    f = weights_file(path)
    tensors, plan, where = read_tensors(f)
    if plan is None and (f.parent / "config.json").is_file():
        try:
            plan = json.loads((f.parent / "config.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            raise UserError(f"{f.parent / 'config.json'}: not valid JSON") from None
    if plan is None:
        raise UserError(f"{f}: carries no sslkit plan to build the encoder from; build it yourself and use "
                        f"sslkit.models.weights.load_pretrained(encoder, path)")
    absent = [k for k in ("encoder", "spatial_dims", "in_channels") if k not in plan]
    if absent or "name" not in plan["encoder"]:
        raise UserError(f"{f}: its sslkit plan lacks {', '.join(absent) or 'encoder.name'}")
    args = {k: v for k, v in (plan["encoder"].get("args") or {}).items() if k != "checkpoint"}
    encoder = build_encoder(plan["encoder"]["name"], spatial_dims=plan["spatial_dims"],
                            in_channels=plan["in_channels"], **args)
    state, _ = _fit(tensors, plan, where, f, encoder)
    encoder.load_state_dict(state, strict=True)
    encoder.plan = plan
    return encoder.eval()
