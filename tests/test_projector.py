"""SubspaceProjector (docs/MOKD.md section 4) against an fp64 reference written out by hand."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gradbal
from gradbal import SubspaceProjector


def reference_loss(proj: SubspaceProjector, zs_all, zt_all) -> float:
    """mean_s mean_elements SmoothL1(LN(W_s z_s + b_s), LN(W_t z_t)), numpy fp64.

    Features must already have matching spatial sizes (resizing is tested separately).
    """
    total = []
    for s, (zs, zt) in enumerate(zip(zs_all, zt_all)):
        ws = proj.student_proj[s].linear.weight.detach().double().numpy()
        bs = proj.student_proj[s].linear.bias.detach().double().numpy()
        wt = proj.teacher_proj[s].weight.detach().double().numpy()
        zs = zs.detach().double().numpy()
        zt = zt.detach().double().numpy()
        if zs.ndim == 4:  # channels last, then it is a linear map per position
            zs = zs.transpose(0, 2, 3, 1)
            zt = zt.transpose(0, 2, 3, 1)
        a = zs @ ws.T + bs
        b = zt @ wt.T

        def ln(x):
            mu = x.mean(-1, keepdims=True)
            var = ((x - mu) ** 2).mean(-1, keepdims=True)
            return (x - mu) / np.sqrt(var + proj.eps)

        d = np.abs(ln(a) - ln(b))
        beta = proj.beta
        total.append(np.where(d < beta, 0.5 * d**2 / beta, d - 0.5 * beta).mean())
    return float(np.mean(total))


@pytest.mark.parametrize("teacher_side", ["orthogonal", "fixed"])
def test_teacher_side_is_semi_orthogonal_and_norm_preserving(teacher_side):
    torch.manual_seed(0)
    proj = SubspaceProjector([8, 24, 5], [16, 24, 40], dim=[32, 24, 48], teacher_side=teacher_side)
    for pt, c, n in zip(proj.teacher_proj, [16, 24, 40], [32, 24, 48]):
        w = pt.weight.detach().double()
        assert w.shape == (n, c)
        torch.testing.assert_close(w.T @ w, torch.eye(c, dtype=torch.float64), atol=1e-5, rtol=0)
        z = torch.randn(7, c)
        torch.testing.assert_close(pt(z).norm(dim=-1), z.norm(dim=-1), atol=1e-4, rtol=1e-5)
    if teacher_side == "fixed":
        assert not any("teacher_proj" in n for n, _ in proj.named_parameters())


def test_orthogonal_teacher_side_stays_orthogonal_while_training():
    torch.manual_seed(0)
    proj = SubspaceProjector(6, 12, dim=20)
    opt = torch.optim.SGD(proj.parameters(), lr=0.5)
    zs, zt = torch.randn(16, 6), torch.randn(16, 12)
    w0 = proj.teacher_proj[0].weight.detach().clone()
    for _ in range(20):
        opt.zero_grad()
        proj(zs, zt).backward()
        opt.step()
    w = proj.teacher_proj[0].weight.detach()
    assert not torch.allclose(w, w0)  # it did learn
    torch.testing.assert_close(w.T @ w, torch.eye(12), atol=1e-5, rtol=0)


@settings(max_examples=25, deadline=None)
@given(
    kind=st.sampled_from(["map", "tokens", "pooled"]),
    cs=st.integers(1, 9),
    ct=st.integers(1, 9),
    extra=st.integers(0, 5),
    beta=st.sampled_from([0.1, 1.0, 2.5]),
    seed=st.integers(0, 2**16),
)
def test_loss_matches_fp64_reference(kind, cs, ct, extra, beta, seed):
    torch.manual_seed(seed)
    dim = max(cs, ct) + extra
    proj = SubspaceProjector([cs, ct], [ct, cs], dim=dim, beta=beta)
    with torch.no_grad():  # a non-zero bias, so the reference checks it too
        for ps in proj.student_proj:
            ps.linear.bias.normal_()
    shapes = {
        "map": lambda c: (3, c, 4, 5),
        "tokens": lambda c: (3, 6, c),
        "pooled": lambda c: (3, c),
    }
    zs = [torch.randn(shapes[kind](cs)), torch.randn(shapes[kind](ct))]
    zt = [torch.randn(shapes[kind](ct)) * 3, torch.randn(shapes[kind](cs))]
    got = proj(zs, zt)
    assert got.shape == () and got.dtype == torch.float32
    want = reference_loss(proj, zs, zt)
    assert got.item() == pytest.approx(want, rel=1e-4, abs=1e-6)
    per_stage = proj.stage_losses(zs, zt)
    assert per_stage.shape == (2,)
    torch.testing.assert_close(per_stage.mean(), got)


def test_feature_maps_equal_tokens_channelwise():
    """A 1x1 convolution on [B, C, H, W] is the linear map on the [B, HW, C] tokens."""
    torch.manual_seed(0)
    proj = SubspaceProjector(5, 7, dim=9)
    zs, zt = torch.randn(2, 5, 3, 4), torch.randn(2, 7, 3, 4)
    tok = lambda z: z.flatten(2).transpose(1, 2)
    torch.testing.assert_close(proj(zs, zt), proj(tok(zs), tok(zt)))


@pytest.mark.parametrize("mode", ["bilinear", "area", "nearest"])
def test_student_map_is_resized_to_the_teacher(mode):
    torch.manual_seed(0)
    proj = SubspaceProjector(4, 6, resize=mode)
    zs, zt = torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4)
    kw = {"align_corners": False} if mode == "bilinear" else {}
    resized = F.interpolate(zs, size=(4, 4), mode=mode, **kw)
    torch.testing.assert_close(proj(zs, zt), proj(resized, zt))
    # upsampling too (a student map smaller than the teacher's)
    small = torch.randn(2, 4, 2, 3)
    torch.testing.assert_close(
        proj(small, zt), proj(F.interpolate(small, size=(4, 4), mode=mode, **kw), zt)
    )


def test_zero_loss_when_projections_agree_and_no_collapse():
    torch.manual_seed(0)
    proj = SubspaceProjector(6, 6, dim=10)
    z = torch.randn(4, 6, 3, 3)
    with torch.no_grad():
        proj.student_proj[0].linear.weight.copy_(proj.teacher_proj[0].weight)
        proj.student_proj[0].linear.bias.zero_()
    assert proj(z, z).item() < 1e-8
    # The teacher side keeps its input's energy; with no affine layer norm the targets have
    # unit variance per position, so the loss cannot be driven to 0 by shrinking anything.
    pt = proj.teacher_proj[0](z)
    torch.testing.assert_close(pt.norm(), z.norm(), rtol=1e-5, atol=1e-5)
    params = {n for n, _ in proj.named_parameters()}
    assert not any("norm" in n for n in params)


@settings(max_examples=15, deadline=None)
@given(scale=st.floats(0.01, 100.0), seed=st.integers(0, 1000))
def test_invariant_to_the_scale_of_either_side(scale, seed):
    torch.manual_seed(seed)
    proj = SubspaceProjector(5, 8, dim=12, eps=1e-12)
    with torch.no_grad():
        proj.student_proj[0].linear.bias.zero_()
    zs, zt = torch.randn(3, 5, 2, 2), torch.randn(3, 8, 2, 2)
    base = proj(zs, zt)
    torch.testing.assert_close(proj(zs * scale, zt), base, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(proj(zs, zt * scale), base, rtol=1e-4, atol=1e-5)


def test_gradients_reach_student_features_and_projectors_only():
    torch.manual_seed(0)
    proj = SubspaceProjector([3, 4], [5, 6])
    zs = [torch.randn(2, 3, 4, 4, requires_grad=True), torch.randn(2, 4, requires_grad=True)]
    zt = [torch.randn(2, 5, 2, 2), torch.randn(2, 6)]
    proj(zs, zt).backward()
    assert all(z.grad is not None and z.grad.abs().sum() > 0 for z in zs)
    assert all(p.grad is not None for p in proj.parameters())


def test_never_changes_the_student():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
    before = {k: v.clone() for k, v in student.state_dict().items()}
    x = torch.randn(3, 1, 6, 6)
    student.eval()
    with torch.no_grad():
        out_before = student(x)
    proj = SubspaceProjector(4, 8, dim=8)
    opt = torch.optim.SGD(proj.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        with torch.no_grad():
            zs = student(x)
        proj(zs, torch.randn(3, 8, 3, 3)).backward()
        opt.step()
    after = student.state_dict()
    for k, v in before.items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=0)
    torch.testing.assert_close(student(x), out_before, rtol=0, atol=0)
    # the projector holds no reference to the student's parameters
    ids = {id(p) for p in student.parameters()}
    assert not any(id(p) in ids for p in proj.parameters())


def test_accepts_dicts_single_tensors_and_low_precision_teachers():
    torch.manual_seed(0)
    proj = SubspaceProjector([3, 4], [5, 6])
    zs = {"a": torch.randn(2, 3, 4, 4), "b": torch.randn(2, 4, 2, 2)}
    zt = {"x": torch.randn(2, 5, 4, 4), "y": torch.randn(2, 6, 2, 2)}
    want = proj(list(zs.values()), list(zt.values()))
    torch.testing.assert_close(proj(zs, zt), want)
    low = proj(zs, {k: v.bfloat16() for k, v in zt.items()})
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(want.item(), rel=2e-2)
    one = SubspaceProjector(3, 5)
    assert one(zs["a"], zt["x"]).shape == ()
    built = SubspaceProjector.from_features(zs, zt, dim=16)
    assert built.student_channels == [3, 4] and built.teacher_channels == [5, 6]
    assert built.dims == [16, 16]
    tokens = SubspaceProjector.from_features(torch.randn(2, 7, 3), torch.randn(2, 7, 9))
    assert tokens.student_channels == [3] and tokens.teacher_channels == [9]
    assert tokens.dims == [9]


def test_as_third_objective_of_the_optimizer():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
    head = nn.Linear(4, 3)
    proj = SubspaceProjector(4, 6, dim=8)
    params = list(student.parameters()) + list(head.parameters()) + list(proj.parameters())
    opt = gradbal.MultiObjectiveOptimizer(torch.optim.SGD(params, lr=0.1), method="mokd")
    x, y = torch.randn(8, 1, 4, 4), torch.randint(0, 3, (8,))
    zt, teacher_logits = torch.randn(8, 6, 2, 2), torch.randn(8, 3)
    feats = student(x)
    logits = head(feats.mean((2, 3)))
    losses = [
        F.cross_entropy(logits, y),
        gradbal.kd_loss(logits, teacher_logits, 4.0),
        proj(feats, zt),
    ]
    opt.zero_grad()
    opt.backward(losses)
    opt.step()
    stats = opt.last_stats
    assert stats.weights.shape == (3,) and torch.isfinite(stats.weights).all()
    assert all(p.grad is not None for p in proj.parameters())


@pytest.mark.parametrize(
    "zs, zt, match",
    [
        (torch.randn(2, 3, 4, 4), torch.randn(3, 5, 4, 4), "batch sizes differ"),
        (torch.randn(2, 3, 4, 4), torch.randn(2, 5), "rank"),
        (torch.randn(2, 3), torch.randn(2, 4, 5), "rank"),
        (torch.randn(2, 3, 4, 4, 1), torch.randn(2, 5, 4, 4, 1), "expected"),
        (torch.randn(2, 4, 4, 4), torch.randn(2, 5, 4, 4), "student feature has 4 channels"),
        (torch.randn(2, 3, 4, 4), torch.randn(2, 6, 4, 4), "teacher feature has 6 channels"),
        (torch.randn(2, 7, 3), torch.randn(2, 8, 5), "token counts differ"),
        ([torch.randn(2, 3)] * 2, [torch.randn(2, 5)] * 2, "1 stage"),
    ],
)
def test_clear_errors_for_mismatched_features(zs, zt, match):
    proj = SubspaceProjector(3, 5)
    with pytest.raises(ValueError, match=match):
        proj(zs, zt)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"student_channels": [3, 4], "teacher_channels": [5]}, ValueError, "2 student stages"),
        ({"dim": 4}, ValueError, "below max"),
        ({"dim": [8, 8]}, ValueError, "2 entries for 1 stages"),
        ({"teacher_side": "identity"}, ValueError, "teacher_side"),
        ({"resize": "linear"}, ValueError, "resize"),
        ({"beta": 0.0}, ValueError, "beta"),
        ({"student_channels": [0]}, ValueError, "positive"),
        ({"student_channels": "3"}, TypeError, "int"),
    ],
)
def test_constructor_errors(kwargs, error, match):
    args = {"student_channels": 3, "teacher_channels": 5}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        SubspaceProjector(**args)
