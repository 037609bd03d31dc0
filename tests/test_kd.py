"""KD helpers: kd_loss against a hand fp64 formula, hooks on torchvision's resnet18, the teacher."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gradbal
from gradbal import FeatureCapture, FrozenTeacher, kd_loss

torchvision = pytest.importorskip("torchvision")


def reference_kd(zs: np.ndarray, zt: np.ndarray, t: float) -> float:
    """T^2 * mean_b sum_c p_t (log p_t - log p_s), fp64, written out by hand."""
    zs = zs.astype(np.float64) / t
    zt = zt.astype(np.float64) / t
    log_ps = zs - zs.max(axis=1, keepdims=True)
    log_ps = log_ps - np.log(np.exp(log_ps).sum(axis=1, keepdims=True))
    log_pt = zt - zt.max(axis=1, keepdims=True)
    log_pt = log_pt - np.log(np.exp(log_pt).sum(axis=1, keepdims=True))
    pt = np.exp(log_pt)
    return float(t * t * (pt * (log_pt - log_ps)).sum(axis=1).mean())


@settings(max_examples=60, deadline=None)
@given(
    b=st.integers(1, 9),
    c=st.integers(2, 13),
    t=st.sampled_from([0.5, 1.0, 2.0, 4.0, 7.3]),
    scale=st.sampled_from([0.1, 1.0, 10.0, 40.0]),
    seed=st.integers(0, 2**16),
)
def test_kd_loss_matches_fp64_formula(b, c, t, scale, seed):
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(b, c, generator=g) * scale
    zt = torch.randn(b, c, generator=g) * scale
    got = kd_loss(zs, zt, temperature=t)
    want = reference_kd(zs.numpy(), zt.numpy(), t)
    assert got.dtype == torch.float32
    assert math.isclose(got.item(), want, rel_tol=1e-4, abs_tol=1e-5 * t * t)


@settings(max_examples=30, deadline=None)
@given(
    b=st.integers(1, 6),
    c=st.integers(2, 9),
    t=st.sampled_from([1.0, 3.0, 4.0]),
    seed=st.integers(0, 2**16),
)
def test_kd_loss_gradient_is_t_times_prob_difference(b, c, t, seed):
    # d/dz_s [T^2 KL(p_t || p_s)] / B = T (p_s - p_t) / B  (Hinton et al. 2015, eq. 2 with T^2)
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(b, c, generator=g, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(b, c, generator=g, dtype=torch.float64)
    kd_loss(zs, zt, temperature=t).backward()
    ps = torch.softmax(zs.detach() / t, 1)
    pt = torch.softmax(zt / t, 1)
    torch.testing.assert_close(zs.grad, t * (ps - pt) / b, rtol=1e-10, atol=1e-12)


def test_kd_loss_equals_the_mdistiller_form():
    torch.manual_seed(0)
    zs, zt, t = torch.randn(8, 100), torch.randn(8, 100), 4.0
    mdistiller = (
        F.kl_div(F.log_softmax(zs / t, 1), F.softmax(zt / t, 1), reduction="none").sum(1).mean()
        * t**2
    )
    torch.testing.assert_close(kd_loss(zs, zt, t), mdistiller)
    torch.testing.assert_close(
        kd_loss(zs, zt, t),
        F.kl_div(F.log_softmax(zs / t, 1), F.softmax(zt / t, 1), reduction="batchmean") * t**2,
    )


def test_kd_loss_zero_for_equal_logits_and_finite_for_extreme_ones():
    z = torch.randn(4, 10)
    assert kd_loss(z, z.clone(), 2.0).abs().item() < 1e-6
    zs = torch.tensor([[1e4, -1e4, 0.0]], requires_grad=True)
    zt = torch.tensor([[-1e4, 1e4, 0.0]])
    loss = kd_loss(zs, zt, 1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(zs.grad).all()
    assert loss.item() == pytest.approx(2e4, rel=1e-5)


def test_kd_loss_dense_predictions_and_reductions():
    torch.manual_seed(1)
    zs, zt = torch.randn(2, 5, 3, 4), torch.randn(2, 5, 3, 4)
    flat_s = zs.permute(0, 2, 3, 1).reshape(-1, 5)
    flat_t = zt.permute(0, 2, 3, 1).reshape(-1, 5)
    torch.testing.assert_close(kd_loss(zs, zt, 2.0), kd_loss(flat_s, flat_t, 2.0))
    per_pos = kd_loss(zs, zt, 2.0, reduction="none")
    assert per_pos.shape == (2, 3, 4)
    torch.testing.assert_close(kd_loss(zs, zt, 2.0, reduction="sum"), per_pos.sum())
    # classes last (tokens)
    torch.testing.assert_close(kd_loss(flat_s, flat_t, 2.0, dim=-1), kd_loss(flat_s, flat_t, 2.0))


def test_kd_loss_upcasts_low_precision_logits():
    torch.manual_seed(2)
    zs, zt = torch.randn(4, 10), torch.randn(4, 10)
    got = kd_loss(zs.bfloat16(), zt.bfloat16(), 4.0)
    assert got.dtype == torch.float32
    want = reference_kd(zs.bfloat16().float().numpy(), zt.bfloat16().float().numpy(), 4.0)
    assert got.item() == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (
            {"student_logits": torch.zeros(2, 3), "teacher_logits": torch.zeros(2, 4)},
            ValueError,
            "differ in shape",
        ),
        (
            {"student_logits": torch.zeros(3), "teacher_logits": torch.zeros(3)},
            ValueError,
            "at least",
        ),
        ({"temperature": 0.0}, ValueError, "temperature"),
        ({"reduction": "batchmean"}, ValueError, "reduction"),
    ],
)
def test_kd_loss_errors(kwargs, error, match):
    args = {"student_logits": torch.zeros(2, 3), "teacher_logits": torch.zeros(2, 3)}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        kd_loss(**args)


# ---------------------------------------------------------------------------- hooks
@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    return model


def manual_resnet_stages(m, x):
    x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
    out = {}
    for name in ("layer1", "layer2", "layer3", "layer4"):
        x = getattr(m, name)(x)
        out[name] = x
    out["avgpool"] = m.avgpool(x)
    out["fc"] = m.fc(torch.flatten(out["avgpool"], 1))
    return out


def test_feature_capture_matches_manual_forward_on_resnet18(resnet):
    x = torch.randn(2, 3, 32, 32)
    names = ["layer3", "layer1", "fc", "avgpool", "layer4"]
    with torch.no_grad(), FeatureCapture(resnet, names) as cap:
        logits = resnet(x)
        feats = cap.pop()
        want = manual_resnet_stages(resnet, x)
    assert list(feats) == names  # the order asked for, not the execution order
    for n in names:
        torch.testing.assert_close(feats[n], want[n], rtol=0, atol=0)
    torch.testing.assert_close(feats["fc"], logits, rtol=0, atol=0)
    assert feats["layer4"].shape == (2, 512, 1, 1)
    assert feats["layer1"].shape == (2, 64, 8, 8)


def test_feature_capture_nested_names_and_graph(resnet):
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    cap = FeatureCapture(model, ["layer4.1.conv2", "layer2.0.downsample.0"])
    model(torch.randn(2, 3, 32, 32))
    feats = cap.pop()
    assert feats["layer4.1.conv2"].shape == (2, 512, 1, 1)
    assert feats["layer2.0.downsample.0"].shape == (2, 128, 4, 4)
    feats["layer4.1.conv2"].sum().backward()  # kept with its graph
    assert model.layer4[1].conv2.weight.grad is not None
    assert model.fc.weight.grad is None
    cap.remove()
    model(torch.randn(2, 3, 32, 32))
    assert cap.features == {}


def test_feature_capture_detach_and_stale_features(resnet):
    cap = FeatureCapture(resnet, "layer2", detach=True)
    resnet(torch.randn(1, 3, 32, 32))
    assert not cap.pop()["layer2"].requires_grad
    with pytest.raises(RuntimeError, match="no output since the last pop"):
        cap.pop()
    cap.remove()


def test_feature_capture_unknown_name_suggests(resnet):
    with pytest.raises(ValueError, match=r"no module named 'layer5'.*did you mean"):
        FeatureCapture(resnet, ["layer1", "layer5"])
    # validation happens before any hook is registered
    assert all(not m._forward_hooks for m in resnet.modules())
    with pytest.raises(ValueError, match="repeat"):
        FeatureCapture(resnet, ["layer1", "layer1"])
    with pytest.raises(ValueError, match="at least one"):
        FeatureCapture(resnet, [])


def test_feature_capture_through_wrappers(resnet):
    teacher = FrozenTeacher(torchvision.models.resnet18(weights=None, num_classes=10))
    with FeatureCapture(teacher, ["layer3"]) as a, FeatureCapture(teacher, ["module.layer3"]) as b:
        teacher(torch.randn(1, 3, 32, 32))
        torch.testing.assert_close(a.pop()["layer3"], b.pop()["module.layer3"])


# ---------------------------------------------------------------------------- teacher
def test_frozen_teacher_stays_in_eval_and_builds_no_graph():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    model.train()
    teacher = FrozenTeacher(model)
    parent = nn.ModuleDict({"student": nn.Linear(2, 2), "teacher": teacher})
    parent.train()
    assert parent["student"].training
    assert not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    stats = model.bn1.running_mean.clone()
    x = torch.randn(4, 3, 32, 32)
    out = teacher(x)
    assert not out.requires_grad and out.grad_fn is None
    torch.testing.assert_close(model.bn1.running_mean, stats, rtol=0, atol=0)
    model.train()  # flipped behind the wrapper's back
    teacher(x)
    assert not model.training
    torch.testing.assert_close(model.bn1.running_mean, stats, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(out, model.eval()(x))


def test_frozen_teacher_outputs_feed_a_student_loss():
    torch.manual_seed(0)
    teacher = FrozenTeacher(nn.Sequential(nn.Linear(5, 3)))
    student = nn.Linear(5, 3)
    x = torch.randn(8, 5)
    loss = kd_loss(student(x), teacher(x), 4.0)
    loss.backward()
    assert student.weight.grad is not None
    assert teacher.module[0].weight.grad is None


def test_frozen_teacher_low_precision():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
    teacher = FrozenTeacher(model, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in teacher.parameters())
    out = teacher(x)  # fp32 input cast inside
    assert out.dtype == torch.bfloat16
    rel = (out.float() - want).norm() / want.norm()
    assert rel < 0.05
    with pytest.raises(ValueError, match="floating"):
        FrozenTeacher(nn.Linear(2, 2), dtype=torch.int8)
    with pytest.raises(TypeError, match="nn.Module"):
        FrozenTeacher(lambda x: x)


def test_frozen_low_precision_teacher_inside_student_autocast():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten())
    teacher = FrozenTeacher(model, dtype=torch.bfloat16)
    x = torch.randn(2, 3, 6, 6)
    with torch.autocast("cpu", dtype=torch.float16):  # the student's AMP region
        out = teacher(x)
    assert out.dtype == torch.bfloat16
    with torch.no_grad():
        want = model(x.bfloat16())
    torch.testing.assert_close(out, want)


def test_exported_from_package_root():
    for name in ("kd_loss", "FeatureCapture", "FrozenTeacher", "SubspaceProjector"):
        assert name in gradbal.__all__ and hasattr(gradbal, name)
