"""VoCo (issue 15): crop geometry and overlap targets against brute force, the loss against a hand computation,
the stop-gradient on base crops, and a loss that falls on crops of the real demo head CT. Its EMA teacher (issue 23,
the journal version's): the loss against the release's loops, one update per optimizer step under accumulation."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sslkit.data.multicrop import cut_windows, overlap_targets, voco_region, voco_sample, voco_windows
from sslkit.errors import ConfigError
from sslkit.objectives import ForwardContext
from sslkit.objectives.registry import build_objective
from sslkit.objectives.voco import VoCo, position_logits, prediction_loss, regularization_loss

from conftest import tiny_swin


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------ geometry


def box_mask(start, size, lo, shape) -> np.ndarray:
    """Boolean voxel mask of one box on a grid whose first voxel is at coordinate lo."""
    m = np.zeros(shape, dtype=bool)
    m[tuple(slice(a - o, a - o + s) for a, o, s in zip(start, lo, size))] = True
    return m


@pytest.mark.parametrize("dims", [2, 3])
def test_overlap_targets_equal_brute_force_voxel_count(dims):
    rng = np.random.default_rng(dims)
    for _ in range(40):
        roi = rng.integers(2, 7, size=dims)
        base = rng.integers(-4, 12, size=(5, dims))
        rand = rng.integers(-4, 12, size=(6, dims))
        got = overlap_targets(rand, base, roi)
        lo, shape = np.full(dims, -4), tuple(int(s) for s in np.full(dims, 12 + 4) + roi)
        want = np.array([[np.logical_and(box_mask(r, roi, lo, shape), box_mask(g, roi, lo, shape)).sum()
                          for g in base] for r in rand]) / np.prod(roi)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-7)


@pytest.mark.parametrize("shape,roi,grid", [((90, 80, 40), (16, 12, 8), 3), ((70, 70, 30), 16, 4),
                                            ((40, 50), (8, 10), 3), ((20, 30, 10), 16, 2), ((12, 12), 8, 2)])
def test_windows_tile_the_region_and_random_crops_lie_in_it(shape, roi, grid):
    dims = len(shape)
    sizes = np.array([roi] * dims if np.isscalar(roi) else roi)
    region = voco_region(shape, roi, grid)
    np.testing.assert_array_equal(region[:2], grid * sizes[:2])
    if dims == 3:
        assert region[2] == sizes[2]  # one crop deep in Z
    for seed in range(25):
        base, rand = voco_windows(shape, roi, grid, 5, np.random.default_rng(seed))
        assert base.shape == (grid * grid, dims) and rand.shape == (5, dims)
        origin = base[0]
        fits = np.asarray(shape) >= region
        assert (origin >= 0).all() and (origin[fits] + region[fits] <= np.asarray(shape)[fits]).all()
        assert (origin[~fits] == 0).all()  # a region larger than the volume starts at 0, the cut is padded
        for k, (i, j) in enumerate(itertools.product(range(grid), range(grid))):  # i over X, j over Y
            want = origin.copy()
            want[0] += i * sizes[0]
            want[1] += j * sizes[1]
            np.testing.assert_array_equal(base[k], want)
        np.testing.assert_allclose(overlap_targets(base, base, roi), np.eye(grid * grid))  # no overlap
        assert (rand >= origin).all() and (rand + sizes <= origin + region).all()
        np.testing.assert_allclose(overlap_targets(rand, base, roi).sum(1), 1.0, atol=1e-6)
    a = voco_windows(shape, roi, grid, 5, np.random.default_rng(7))
    b = voco_windows(shape, roi, grid, 5, np.random.default_rng(7))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_random_crops_cover_the_whole_region():
    """Over many draws, random crop corners reach both ends of the region in X and Y."""
    starts = np.concatenate([voco_windows((64, 64, 16), 16, 4, 8, np.random.default_rng(s))[1] for s in range(50)])
    assert starts[:, 0].min() == 0 and starts[:, 0].max() == 48
    assert starts[:, 1].min() == 0 and starts[:, 1].max() == 48 and (starts[:, 2] == 0).all()


def test_cut_windows_zero_pads_outside_the_volume():
    rng = np.random.default_rng(0)
    vol = rng.random((2, 9, 7, 5)).astype(np.float32)
    starts = np.array([[0, 0, 0], [-3, 2, 1], [6, 5, 3], [20, 0, 0]])
    got = cut_windows(vol, starts, (4, 4, 3))
    padded = np.pad(vol, ((0, 0), (8, 30), (8, 8), (8, 8)))
    for n, s in enumerate(starts):
        want = padded[(slice(None),) + tuple(slice(a + 8, a + 8 + r) for a, r in zip(s, (4, 4, 3)))]
        np.testing.assert_array_equal(got[n], want)
    item = voco_sample(vol, 4, 2, 3, rng)
    assert item["voco_base"].shape == (4, 2, 4, 4, 4) and item["voco_targets"].shape == (3, 4)


# ------------------------------------------------------------------------------------------ loss


def hand_loss(rand_proj, base_proj, targets, reg_weight, form="official"):
    """The authors' loops (online_assign, ce_loss, regularization_loss) in plain Python on float64."""
    rp, bp, y = rand_proj.double().tolist(), base_proj.double().tolist(), targets.double().tolist()

    def cos(a, b):
        return sum(u * v for u, v in zip(a, b)) / math.sqrt(sum(u * u for u in a) * sum(v * v for v in b))

    preds, regs = [], []
    for b in range(len(rp)):
        logit = [[max(0.0, cos(p, q)) for q in bp[b]] for p in rp[b]]
        pairs = [(y[b][r][g], logit[r][g]) for r in range(len(logit)) for g in range(len(logit[0]))]
        if form == "official":
            pos = sum(-t * math.log(1 - abs(t - v) + 1e-6) for t, v in pairs) / (sum(t for t, _ in pairs) + 1e-6)
            zeros = [v for t, v in pairs if t == 0]
            neg = sum(v * v for v in zeros) / (len(zeros) + 1e-6)
            preds.append(pos + neg)
        else:
            preds.append(sum(-math.log(1 - abs(t - v) + 1e-6) for t, v in pairs) / len(pairs))
        g = len(bp[b])
        sims = [max(0.0, cos(bp[b][i], bp[b][j])) ** 2 for i in range(g) for j in range(i + 1, g)]
        regs.append(sum(sims) / len(sims))
    pred, reg = sum(preds) / len(preds), sum(regs) / len(regs)
    return pred + reg_weight * reg, pred, reg


def small_case(seed=0, b=2, r=3, g=4, d=5):
    gen = torch.Generator().manual_seed(seed)
    rand_proj, base_proj = torch.randn(b, r, d, generator=gen), torch.randn(b, g, d, generator=gen)
    targets = torch.rand(b, r, g, generator=gen)
    targets[targets < 0.4] = 0.0  # zero targets exercise the negative term
    return rand_proj, base_proj, targets / targets.sum(-1, keepdim=True).clamp_min(1e-6)


@pytest.mark.parametrize("form", ["official", "uniform"])
def test_loss_equals_hand_computation(form):
    rand_proj, base_proj, targets = small_case()
    pred, pos, neg = prediction_loss(position_logits(rand_proj, base_proj), targets, form)
    reg = regularization_loss(base_proj)
    want_total, want_pred, want_reg = hand_loss(rand_proj, base_proj, targets, 0.5, form)
    assert math.isclose(float(pred), want_pred, rel_tol=1e-5)
    assert math.isclose(float(reg), want_reg, rel_tol=1e-5)
    assert math.isclose(float(pred + 0.5 * reg), want_total, rel_tol=1e-5)
    if form == "official":
        assert float(neg) > 0 and math.isclose(float(pos + neg), float(pred), rel_tol=1e-6)


def test_objective_wires_crops_projector_and_loss():
    """The objective encodes base and random crops in one call and its loss is the hand formula on its own
    projections (so the concatenation and reshapes put every crop where it belongs)."""
    torch.manual_seed(0)
    enc = tiny_swin(3)
    obj = VoCo(enc, hidden_dim=32, out_dim=16, head_norm="layer", reg_weight=0.7, teacher="none")
    b, g, r = 2, 4, 3
    base, rand = torch.rand(b, g, 1, 16, 16, 16), torch.rand(b, r, 1, 16, 16, 16)
    targets = small_case(1, b, r, g)[2]
    ctx = ForwardContext({}, enc)
    out = obj({"voco_base": base, "voco_random": rand, "voco_targets": targets}, enc, ctx)
    assert ctx.encoder_calls == 1
    with torch.no_grad():
        proj = lambda x: obj.projector(enc(x)[-1].flatten(2).mean(-1))  # noqa: E731
        base_proj = proj(base.flatten(0, 1)).view(b, g, -1)
        rand_proj = proj(rand.flatten(0, 1)).view(b, r, -1)
    want, want_pred, want_reg = hand_loss(rand_proj, base_proj, targets, 0.7)
    assert math.isclose(float(out.loss.detach()), want, rel_tol=1e-4)
    assert math.isclose(out.logs["pred"], want_pred, rel_tol=1e-4)
    assert math.isclose(out.logs["reg"], want_reg, rel_tol=1e-4)
    torch.testing.assert_close(out.embeddings, rand_proj.flatten(0, 1), rtol=1e-4, atol=1e-5)


def test_prediction_term_sends_no_gradient_to_base_crops():
    rand_proj, base_proj, targets = small_case(2)
    rand_proj.requires_grad_()
    base_proj.requires_grad_()
    pred, _, _ = prediction_loss(position_logits(rand_proj, base_proj), targets)
    pred.backward()
    assert base_proj.grad is None and rand_proj.grad.abs().sum() > 0
    base_proj.grad = None
    regularization_loss(base_proj).backward()
    assert base_proj.grad.abs().sum() > 0

    # Through the encoder (LayerNorm heads keep crops independent): the prediction term alone leaves the base
    # crops' pixels without gradient; the regularisation term gives them one.
    torch.manual_seed(0)
    enc = tiny_swin(3)
    for reg_weight, base_moves in ((0.0, False), (1.0, True)):
        obj = VoCo(enc, hidden_dim=32, out_dim=16, head_norm="layer", reg_weight=reg_weight, teacher="none")
        base = torch.rand(1, 4, 1, 16, 16, 16, requires_grad=True)
        rand = torch.rand(1, 2, 1, 16, 16, 16, requires_grad=True)
        targets = torch.tensor([[[0.5, 0.5, 0.0, 0.0], [0.0, 0.25, 0.0, 0.75]]])
        obj({"voco_base": base, "voco_random": rand, "voco_targets": targets}, enc).loss.backward()
        assert (base.grad.abs().sum() > 0) == base_moves
        assert rand.grad.abs().sum() > 0


def test_registry_and_batch_checks():
    enc = tiny_swin(2)
    obj = build_objective({"name": "voco", "hidden_dim": 32, "out_dim": 16, "reg_weight": 2.0}, enc)
    assert isinstance(obj, VoCo) and obj.reg_weight == 2.0
    with pytest.raises(ConfigError, match="reg_wieght"):
        build_objective({"name": "voco", "reg_wieght": 1.0}, enc)
    with pytest.raises(ConfigError, match="prediction"):
        build_objective({"name": "voco", "prediction": "softmax"}, enc)
    batch = {"voco_base": torch.rand(2, 4, 1, 32, 32), "voco_random": torch.rand(2, 3, 1, 32, 32),
             "voco_targets": torch.rand(2, 4, 3)}
    with pytest.raises(ValueError, match="shapes disagree"):
        obj(batch, enc)
    batch["voco_targets"] = torch.rand(2, 3, 4)
    out = obj(batch, enc)  # 2-D works; the default is the journal version, with its teacher's inter-volume term
    assert out.embeddings.shape == (6, 16) and set(out.logs) == {"pred", "pos", "neg", "reg", "acc", "inter"}
    assert out.teacher_embeddings.shape == (6, 16) and set(obj.teachers()) == {"teacher"}
    with pytest.raises(ConfigError, match="inter_weight needs the teacher"):
        build_objective({"name": "voco", "teacher": "none", "inter_weight": 1.0}, enc)


# ------------------------------------------------------------------------------------------ real scan


def ct_volume(demo_dir, spacing=3.0) -> np.ndarray:
    """The demo head CT, window -175..250 HU -> [0, 1], resampled to ~`spacing` mm: (1, X, Y, Z) float32."""
    import nibabel as nib

    img = nib.load(str(demo_dir / "ct_head.nii.gz"))
    hu = torch.from_numpy(np.asarray(img.dataobj, dtype=np.float32))
    x = ((hu.clamp(-175.0, 250.0) + 175.0) / 425.0)[None, None]
    size = [max(8, round(n * z / spacing)) for n, z in zip(hu.shape, img.header.get_zooms()[:3])]
    return F.interpolate(x, size=size, mode="area")[0].numpy()


def test_voco_loss_falls_on_real_ct_crops(demo_dir):
    """The single-encoder form (teacher: none; the teacher only moves in the engine's optimizer steps): a tiny
    Swin-UNETR + VoCo head over 30 Adam steps on a fixed pool of 2 batches of VoCo crops (roi 32^3 at
    3 mm, grid 3, 4 random crops, 2 regions per batch; the 96 x 96 region reaches past the 82-voxel head and is
    zero-padded) cut from the real head CT: the loss must fall clearly."""
    vol = ct_volume(demo_dir)  # (1, 82, 82, 54)
    pool = []
    for k in range(2):
        items = [voco_sample(vol, 32, 3, 4, np.random.default_rng([5, k, i])) for i in range(2)]
        pool.append({key: torch.from_numpy(np.stack([it[key] for it in items])) for key in items[0]})
    torch.manual_seed(0)
    enc = tiny_swin(3)
    obj = build_objective({"name": "voco", "hidden_dim": 256, "out_dim": 256, "teacher": "none"}, enc)
    opt = torch.optim.Adam(list(enc.parameters()) + list(obj.parameters()), lr=3e-4)  # 1e-3 oscillates between the two pool batches
    losses, accs = [], []
    for step in range(30):
        out = obj(pool[step % 2], enc)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
        accs.append(out.logs["acc"])
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    print(f"voco real-CT loss: first 5 {[round(v, 4) for v in losses[:5]]} "
          f"last 5 {[round(v, 4) for v in losses[-5:]]} acc last 5 {accs[-5:]}")
    assert all(math.isfinite(v) for v in losses)
    assert last < 0.6 * first, f"first {first:.4f} last {last:.4f}: {losses}"


# ------------------------------------------------------------------------------------------ EMA teacher


def hand_teacher_loss(s_rand, s_base, t_rand, t_base, targets, reg_weight, inter_weight):
    """Large-Scale-Medical's loops (online_assign, ce_loss with the -log(1 - l) negative, inter_volume,
    regularization_loss) in plain Python on float64: student crops vs teacher bases; volume b's crops vs volume
    b + 1's bases with the teacher's logits as the target."""
    def cos(a, b):
        return sum(u * v for u, v in zip(a, b)) / math.sqrt(sum(u * u for u in a) * sum(v * v for v in b))

    def assign(feats, bases):
        return [[max(0.0, cos(f, q)) for q in bases] for f in feats]

    def ce(labels, logits):
        pairs = [(t, v) for lr, gr in zip(labels, logits) for t, v in zip(lr, gr)]
        pos = sum(-t * math.log(1 - abs(t - v) + 1e-6) for t, v in pairs) / (sum(t for t, _ in pairs) + 1e-6)
        zeros = [v for t, v in pairs if t == 0]
        return pos + sum(-math.log(1 - v + 1e-6) for v in zeros) / (len(zeros) + 1e-6)

    sr, sb, tr, tb, y = (x.double().tolist() for x in (s_rand, s_base, t_rand, t_base, targets))
    n = len(sr)
    intra = sum(ce(y[b], assign(sr[b], tb[b])) for b in range(n)) / n
    inter = sum(ce(assign(tr[b], tb[(b + 1) % n]), assign(sr[b], sb[(b + 1) % n])) for b in range(n)) / n
    regs = []
    for b in range(n):
        g = len(sb[b])
        sims = [max(0.0, cos(sb[b][i], sb[b][j])) ** 2 for i in range(g) for j in range(i + 1, g)]
        regs.append(sum(sims) / len(sims))
    reg = sum(regs) / n
    return intra + inter_weight * inter + reg_weight * reg, intra, inter


def test_teacher_loss_equals_the_journal_release_loops():
    torch.manual_seed(0)
    enc = tiny_swin(3)
    obj = VoCo(enc, hidden_dim=32, out_dim=16, head_norm="layer", reg_weight=0.7, inter_weight=0.5,
               feature_dropout=0.0)
    assert obj.negative == "log" and obj.teacher is not None
    with torch.no_grad():  # the student projector away from its teacher copy
        for p in obj.projector.parameters():
            p.add_(0.1 * torch.randn_like(p))
    b, g, r = 3, 4, 2
    base, rand = torch.rand(b, g, 1, 16, 16, 16), torch.rand(b, r, 1, 16, 16, 16)
    targets = small_case(3, b, r, g)[2]
    out = obj({"voco_base": base, "voco_random": rand, "voco_targets": targets}, enc)
    with torch.no_grad():
        h = lambda x: enc(x.flatten(0, 1))[-1].flatten(2).mean(-1)  # noqa: E731
        s_base, s_rand = obj.projector(h(base)).view(b, g, -1), obj.projector(h(rand)).view(b, r, -1)
        tp = obj.teacher["projector"]
        t_base, t_rand = tp(h(base)).view(b, g, -1), tp(h(rand)).view(b, r, -1)
    # the projector's layer norm is per crop, so projecting bases and random crops apart is the same
    want, intra, inter = hand_teacher_loss(s_rand, s_base, t_rand, t_base, targets, 0.7, 0.5)
    assert math.isclose(out.logs["pred"], intra, rel_tol=1e-4)
    assert math.isclose(out.logs["inter"], inter, rel_tol=1e-4)
    assert math.isclose(float(out.loss.detach()), want, rel_tol=1e-4)


def test_teacher_moves_only_on_optimizer_steps_by_the_constant_momentum():
    torch.manual_seed(0)
    enc = tiny_swin(3)
    obj = VoCo(enc, hidden_dim=32, out_dim=16, head_norm="layer")
    batch = {"voco_base": torch.rand(2, 4, 1, 16, 16, 16), "voco_random": torch.rand(2, 2, 1, 16, 16, 16),
             "voco_targets": small_case(4, 2, 2, 4)[2]}
    before = {k: v.clone() for k, v in obj.teacher.state_dict().items()}
    for _ in range(2):  # micro-batches: the release moved its teacher in every forward, sslkit does not
        obj(batch, enc).loss.backward()
    assert all(torch.equal(v, obj.teacher.state_dict()[k]) for k, v in before.items())
    with torch.no_grad():
        for p in obj.projector.parameters():
            p.add_(1.0)
    obj.on_optimizer_step(1, 100)
    for (name, t), s in zip(obj.teacher["projector"].named_parameters(), obj.projector.parameters()):
        torch.testing.assert_close(t, 0.9 * before[f"projector.{name}"] + 0.1 * s.detach())
    assert obj.log_scalars() == {"ema_tau": 0.9, "ema_updates": 1.0}


def test_teacher_updates_once_per_optimizer_step_under_accumulation(demo_dir, scan_cache, tmp_path):
    """The engine with micro-batch 2 x accumulation 2 for 3 steps: 6 micro-batches, 3 teacher updates, and the
    checkpointed teacher projector equals the hand EMA (0.9) of the checkpointed students."""
    from conftest import ckpt_tensors, tiny_raw
    from sslkit.config import config_from_dict
    from sslkit.engine.trainer import build_model, pretrain

    raw = tiny_raw(demo_dir, scan_cache, train={"micro_batch_size": 2, "grad_accum_steps": 2, "max_steps": 3},
                   objectives=[{"name": "voco", "grid": 2, "n_random": 2, "hidden_dim": 32, "out_dim": 16,
                                "head_norm": "layer"}])
    run = pretrain(config_from_dict(raw), tmp_path / "run", progress=False)
    rows = [json.loads(x) for x in (run.run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [m["micro_step"] for m in rows] == [2, 4, 6]
    assert [m["ema_updates"] for m in rows] == [1, 2, 3] and all(m["ema_tau"] == 0.9 for m in rows)
    torch.manual_seed(raw["train"]["seed"])  # the engine's initial weights
    prefix = "objectives.objectives.0.projector."
    teacher = {k[len(prefix):]: v.double() for k, v in build_model(config_from_dict(raw)).state_dict().items()
               if k.startswith(prefix)}
    for step in (1, 2, 3):
        student, _ = ckpt_tensors(run.run_dir, step)
        teacher = {k: 0.9 * v + 0.1 * student[prefix + k].double() for k, v in teacher.items()}
    _, saved = ckpt_tensors(run.run_dir, 3)
    assert int(saved["0.teacher._updates"]) == 3
    assert max(float((saved[f"0.teacher.projector.{k}"].double() - v).abs().max()) for k, v in teacher.items()) < 1e-6
