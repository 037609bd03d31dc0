"""examples/classification/train_kd.py on a tiny generated ImageFolder (nothing downloaded)."""

import csv
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import timm  # a dev dependency: the DeiT recipes' timm path is tested, never skipped
import torch

import gradbal

pytest.importorskip("torchvision")
Image = pytest.importorskip("PIL.Image")

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "classification" / "train_kd.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gradbal_train_kd", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tk():
    return load_script()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """3 classes of 32x32 RGB images: 8 per class in train/, 3 in val/."""
    root = tmp_path_factory.mktemp("imagefolder")
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 8), ("val", 3)):
        for c in range(3):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                img = torch.rand(32, 32, 3, generator=g) * 0.5
                img[..., c] += 0.5  # a learnable colour cue
                arr = (img.clamp(0, 1) * 255).to(torch.uint8).numpy()
                Image.fromarray(arr).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def teacher_ckpt(tk, tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "cnn8.pth"
    torch.save({"model": tk.build_model("cnn8", 3, 3).state_dict()}, path)
    return path


def base_args(data, teacher_ckpt, out, *extra):
    return [
        "--dataset", "imagefolder", "--data-path", str(data), "--teacher", "cnn8",
        "--student", "cnn4", "--teacher-ckpt", str(teacher_ckpt), "--image-size", "32",
        "--augment", "cifar", "--batch-size", "6", "--lr", "0.05", "--workers", "0",
        "--log-every", "1", "--progress", "false", "--output-dir", str(out), *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("method, features", [("mokd", "true"), ("sum", "false")])
def test_one_epoch(tk, data, teacher_ckpt, tmp_path, method, features):
    out = tmp_path / method
    extra = ["--method", method, "--features", features, "--epochs", "1"]
    result = tk.main(base_args(data, teacher_ckpt, out, *extra))
    assert result["finished"]
    assert result["teacher_top1"] is not None
    files = ("config.json", "metrics.csv", "diagnostics.csv", "checkpoint.pth", "student_final.pth")
    for name in files:
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 1 and config["effective_batch"] == 6
    assert config["lr_used"] == 0.05 and config["method"] == method
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert len(rows) == 1 and 0 <= float(rows[0]["top1"]) <= 100
    diag = list(csv.DictReader((out / "diagnostics.csv").open()))
    k = 3 if features == "true" else 2
    assert len(diag) == 4  # 24 images / batch 6, logged every step
    assert f"cos_0{k - 1}" in diag[0]
    if method == "sum":  # the fixed classic-KD weights, applied to the losses
        assert float(diag[0]["weight_0"]) == 1.0
    # the shipped student has no projector parameters
    final = torch.load(out / "student_final.pth", weights_only=True)
    assert set(final) == set(tk.build_model("cnn4", 3, 3).state_dict())


def test_compiled_method_one_epoch(tk, data, teacher_ckpt, tmp_path):
    """--compile-method true: the same run with the K x K stage through gradbal.compile_method
    gives the eager run's weights (to torch.compile's rounding) and a checkpoint that names
    the method as usual."""
    runs = {}
    for flag in ("false", "true"):
        out = tmp_path / flag
        extra = ["--method", "gradvac", "--epochs", "1", "--compile-method", flag]
        with warnings.catch_warnings():
            # A fallback to eager would pass the comparison below: make it fail the test.
            warnings.filterwarnings("error", message="gradbal: torch.compile")
            assert tk.main(base_args(data, teacher_ckpt, out, *extra))["finished"]
        assert json.loads((out / "config.json").read_text())["compile_method"] == (flag == "true")
        runs[flag] = torch.load(out / "student_final.pth", weights_only=True)
    for name, eager in runs["false"].items():
        torch.testing.assert_close(runs["true"][name], eager, rtol=1e-5, atol=1e-6)


def test_graph_method_one_epoch(tk, data, teacher_ckpt, tmp_path):
    """--graph-method true: recorded in the config; on the CPU graph_method is the plain
    method, so the run's weights are the eager run's, bit for bit."""
    runs = {}
    for flag in ("false", "true"):
        out = tmp_path / flag
        extra = ["--method", "upgrad", "--epochs", "1", "--graph-method", flag]
        assert tk.main(base_args(data, teacher_ckpt, out, *extra))["finished"]
        assert json.loads((out / "config.json").read_text())["graph_method"] == (flag == "true")
        runs[flag] = torch.load(out / "student_final.pth", weights_only=True)
    for name, eager in runs["false"].items():
        assert torch.equal(runs["true"][name], eager), name


def test_scratch_trains_a_teacher(tk, data, teacher_ckpt, tmp_path):
    """--method scratch (the same train_step, CE alone, the plain optimizer): no teacher is
    needed, no KD column or diagnostics are written, and its student is a usable teacher."""
    out = tmp_path / "scratch"
    args = [
        a
        for a in base_args(data, teacher_ckpt, out)
        if a not in ("--teacher-ckpt", str(teacher_ckpt))
    ]
    result = tk.main(args + ["--method", "scratch", "--student", "cnn8", "--epochs", "2"])
    assert result["finished"] and result["teacher_top1"] is None
    rows = read_csv(out / "metrics.csv")
    assert len(rows) == 2 and rows[0]["loss_kd"] == "" and math.isfinite(float(rows[1]["loss_ce"]))
    assert not (out / "diagnostics.csv").exists()
    assert json.loads((out / "config.json").read_text())["objectives"] == ["ce"]
    kd = tk.main(base_args(data, out / "student_final.pth", tmp_path / "kd", "--epochs", "1"))
    assert kd["finished"] and kd["teacher_top1"] == result["history"][-1]["top1"]


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_one_epoch(tk, data, teacher_ckpt, tmp_path, amp):
    out = tmp_path / amp
    extra = ["--method", "mokd", "--features", "true", "--epochs", "1", "--amp", amp]
    result = tk.main(base_args(data, teacher_ckpt, out, *extra, "--teacher-dtype", "bf16"))
    assert result["finished"]
    assert all(torch.isfinite(p).all() for p in result["student"].parameters())


def test_resume_equals_uninterrupted(tk, data, teacher_ckpt, tmp_path):
    # mixup/cutmix draw from numpy's RNG: its state must come back too
    common = ["--method", "mokd", "--features", "true", "--epochs", "3", "--mixup", "0.8",
              "--cutmix", "1.0"]  # fmt: skip
    full = tk.main(base_args(data, teacher_ckpt, tmp_path / "full", *common))
    part = tk.main(
        base_args(data, teacher_ckpt, tmp_path / "split", *common, "--stop-after-epochs", "1")
    )
    assert not part["finished"] and len(part["history"]) == 1
    assert not (tmp_path / "split" / "student_final.pth").exists()
    resumed = tk.main(base_args(data, teacher_ckpt, tmp_path / "split", *common, "--resume"))
    assert resumed["finished"] and len(resumed["history"]) == 3
    a = torch.load(tmp_path / "full" / "student_final.pth", weights_only=True)
    b = torch.load(tmp_path / "split" / "student_final.pth", weights_only=True)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [r["top1"] for r in full["history"]] == [r["top1"] for r in resumed["history"]]


def torchrun(args, timeout=240):
    exe = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    if not Path(exe).exists():
        pytest.skip("torchrun not found")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [exe, "--standalone", "--nproc_per_node", "2", str(SCRIPT), *args]
    proc = subprocess.run(
        cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def read_csv(path):
    return list(csv.DictReader(path.open()))


def as_floats(rows, prefix):
    return torch.tensor(
        [[float(v) for k, v in row.items() if k.startswith(prefix)] for row in rows],
        dtype=torch.float64,
    )


@pytest.mark.parametrize("method", ["mokd", "famo"])
def test_two_processes_equal_one_process(tk, data, teacher_ckpt, tmp_path, method):
    """torchrun, 2 gloo processes x 3 images = 1 process x 6 images, step for step.

    Deterministic data (no augmentation; DistributedSampler splits one shuffled order, so each
    step's two shards are exactly the one-process batch) and a per-sample normalisation in the
    student (GroupNorm: BatchNorm would normalise each shard by itself). mokd is exact through
    the optimizer's process_group (gradients averaged per objective before the Gram matrix);
    famo (loss-based, with the published update="after_step") through the script's averaging
    of the loss values, of the gradient, and of the losses re-evaluated after each step.
    """
    extra = ["--student", "cnn4gn", "--augment", "none", "--method", method,
             "--features", "true", "--epochs", "2"]  # fmt: skip
    if method == "famo":  # the published rule: losses re-evaluated after each step
        extra += ["--method-options", "update=after_step"]
    torchrun(base_args(data, teacher_ckpt, tmp_path / "ddp", *extra))
    one = tk.main(base_args(data, teacher_ckpt, tmp_path / "one", *extra))
    assert one["finished"]

    config = json.loads((tmp_path / "ddp" / "config.json").read_text())
    assert config["world_size"] == 2
    assert config["per_process_batch"] == 3 and config["effective_batch"] == 6
    ddp_metrics = read_csv(tmp_path / "ddp" / "metrics.csv")
    assert [float(r["replica_max_diff"]) for r in ddp_metrics] == [0.0, 0.0]  # same on both ranks

    # The balancing, step by step (rank 0 logs; both ranks hold the same parameters).
    ddp, ref = (read_csv(tmp_path / d / "diagnostics.csv") for d in ("ddp", "one"))
    assert len(ddp) == len(ref) == 8  # 2 epochs x 24 images / 6
    for prefix in ("weight_", "loss_", "grad_norm_", "cos_"):
        torch.testing.assert_close(
            as_floats(ddp, prefix), as_floats(ref, prefix), rtol=1e-5, atol=1e-7,
            equal_nan=True, msg=lambda m, p=prefix: f"{p}: {m}",
        )  # fmt: skip
    assert as_floats(ddp, "weight_").std(0).max() > 1e-4  # the weights did move
    # ... and the trained student after 8 steps.
    a = torch.load(tmp_path / "ddp" / "student_final.pth", weights_only=True)
    b = torch.load(tmp_path / "one" / "student_final.pth", weights_only=True)
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7, msg=key)
    assert [float(r["top1"]) for r in ddp_metrics] == [r["top1"] for r in one["history"]]


def test_two_processes_batchnorm_augmented(data, teacher_ckpt, tmp_path):
    """The usual case (BatchNorm student, random augmentation) completes under torchrun with
    the processes' parameters identical after every epoch; with uw, whose log-variances are
    parameters of the wrapped optimizer trained from the (process-averaged) loss values."""
    out = tmp_path / "ddp"
    torchrun(base_args(data, teacher_ckpt, out, "--method", "uw", "--epochs", "2"))
    assert [float(r["replica_max_diff"]) for r in read_csv(out / "metrics.csv")] == [0.0, 0.0]
    assert (out / "student_final.pth").is_file()


def test_deit_style_training(tk, data, teacher_ckpt, tmp_path):
    """The DeiT recipe's pieces on the tiny set: mixup + cutmix with label smoothing, repeated
    augmentation, timm's warm-up + cosine schedule (per epoch)."""
    out = tmp_path / "deit"
    extra = ["--method", "mokd", "--features", "true", "--epochs", "3", "--mixup", "0.8",
             "--cutmix", "1.0", "--label-smoothing", "0.1", "--repeated-aug", "3",
             "--schedule", "cosine", "--warmup-epochs", "1", "--warmup-lr", "0.005",
             "--min-lr", "0.001"]  # fmt: skip
    result = tk.main(base_args(data, teacher_ckpt, out, *extra))
    assert result["finished"]
    assert all(torch.isfinite(p).all() for p in result["student"].parameters())
    lrs = [r["lr"] for r in result["history"]]
    expected = [0.005] + [0.001 + 0.049 * 0.5 * (1 + math.cos(math.pi * e / 3)) for e in (1, 2)]
    assert lrs == pytest.approx(expected)
    assert len(read_csv(out / "diagnostics.csv")) == 3 * 4  # RA keeps the epoch's length


def test_mixup_cutmix_targets(tk):
    np.random.seed(0)
    mix = tk.MixupCutmix(0.8, 1.0, 0.5, 0.1, num_classes=5)
    x = torch.arange(4.0)[:, None, None, None].expand(4, 1, 8, 8).contiguous()
    y = torch.tensor([0, 1, 2, 3])
    seen = set()
    for _ in range(20):
        xm, t = mix(x, y)
        assert t.shape == (4, 5) and torch.allclose(t.sum(1), torch.ones(4))
        assert t.min() >= 0.1 / 5 - 1e-7
        # the share of image b in mixed image 0 (whose partner is image 3) is the target's
        share = (xm[0] / 3).mean().item()  # pixels are 0 (own) or 3 (pasted) or a blend
        lam = (t[0, 0].item() - 0.02) / 0.9
        assert share == pytest.approx(1 - lam, abs=1e-5)
        seen.add(bool(((xm[0] == 0) | (xm[0] == 3)).all()))  # cutmix keeps pure pixels
    assert seen == {True, False}  # both modes were drawn
    _, t = tk.MixupCutmix(0.0, 1.0, 0.5, 0.0, 5)(x, y)  # cutmix only, no smoothing
    assert t.max() <= 1 and t.sum() == pytest.approx(4)


def test_repeated_augmentation_sampler(tk):
    n, repeats = 12, 3
    for world in (1, 2, 3):
        parts = [list(tk.RepeatedAugSampler(n, world, r, repeats, seed=0)) for r in range(world)]
        assert all(len(p) == n // world for p in parts)
        if world == 3:  # the 3 copies of an image go to the 3 processes, in the same step
            assert parts[0] == parts[1] == parts[2] and len(set(parts[0])) == 4
    s = tk.RepeatedAugSampler(n, 1, 0, repeats, seed=0)
    first = list(s)
    assert first[:3] == [first[0]] * 3 and list(s) == first  # seeded by epoch
    s.set_epoch(1)
    assert list(s) != first


def test_clear_errors(tk, data, teacher_ckpt, tmp_path):
    ok = base_args(data, teacher_ckpt, tmp_path / "e", "--epochs", "1")

    def expect(args, match):
        with pytest.raises(tk.ConfigError, match=match):
            tk.main(args)

    missing = tmp_path / "nowhere"
    expect(ok + ["--data-path", str(missing)], "does not exist")
    (tmp_path / "no_val" / "train").mkdir(parents=True)
    expect(ok + ["--data-path", str(tmp_path / "no_val")], "ImageFolder layout expected")
    wrong = tmp_path / "cnn16.pth"
    torch.save(tk.build_model("cnn16", 3, 3).state_dict(), wrong)
    expect(ok + ["--teacher-ckpt", str(wrong)], "does not fit architecture 'cnn8'")
    expect(ok + ["--teacher-ckpt", str(tmp_path / "none.pth")], "does not exist")
    expect(ok + ["--recipe", "imagenet_r99_r1"], "unknown recipe")
    expect(ok + ["--method", "no_such_method"], "unknown method")
    expect(ok + ["--method", "mokd", "--method-options", "magnitude=huge"], "magnitude")
    expect(ok + ["--resume", str(tmp_path / "missing.pth")], "no such checkpoint")
    expect(ok + ["--loss-weights", "1,2,3"], "needs 2 values")
    no_teacher = [a for a in ok if a not in ("--teacher-ckpt", str(teacher_ckpt))]
    expect(no_teacher, "needs a teacher")
    expect(["--dataset", "cifar100", "--teacher", "cnn8", "--student", "cnn4"], "--data-path")
    expect(ok + ["--student", "resnet99"], "unknown model 'resnet99'")
    expect(ok + ["--drop-path", "0.1"], "applies to timm models")
    expect(ok + ["--repeated-aug", "0"], "--repeated-aug must be >= 1")
    expect(ok + ["--mixup", "-1"], "--mixup must be >= 0")
    expect(ok + ["--label-smoothing", "1"], "--label-smoothing below 1")
    expect(ok + ["--method", "pcgrad", "--graph-method", "true"], "draws from the generator.*compile")
    expect(ok + ["--graph-method", "true", "--compile-method", "true"], "not both")


def test_recipes_resolve_and_flags_override(tk):
    cfg = tk.resolve_config(["--recipe", "imagenet_r34_r18", "--data-path", "/x"])
    assert (cfg["epochs"], cfg["batch_size"], cfg["lr"]) == (100, 512, 0.2)
    assert cfg["milestones"] == [30, 60, 90] and cfg["temperature"] == 1.0
    cfg = tk.resolve_config(
        ["--recipe", "cifar100_r32x4_r8x4", "--data-path", "/x", "--lr", "0.01"]
    )
    assert cfg["lr"] == 0.01 and cfg["loss_weights"] == [0.1, 0.9] and cfg["epochs"] == 240
    for name in tk.RECIPES:
        cfg = tk.resolve_config(["--recipe", name, "--data-path", "/x"])
        assert cfg["teacher"] and cfg["student"]


# ----------------------------------------------------------------------------- timm (DeiT recipes)
@pytest.fixture
def one_thread():
    """timm's models on a loaded 2-core machine: two threads competing with other jobs run
    about 10x slower than one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def timm_calls(monkeypatch):
    """Every ``timm.create_model`` call as (name, pretrained, kwargs): nothing may download."""
    calls, real = [], timm.create_model

    def spy(name, pretrained=False, **kwargs):
        calls.append((name, pretrained, kwargs))
        return real(name, pretrained=pretrained, **kwargs)

    monkeypatch.setattr(timm, "create_model", spy)
    return calls


@pytest.fixture(scope="module")
def regnet_teacher(tmp_path_factory):
    """A small RegNetY (regnety_002, 2.8M parameters) standing in for RegNetY-160, saved from
    plain timm the way the README saves the real teacher."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "regnety_002.pth"
    torch.save(timm.create_model("regnety_002", pretrained=False, num_classes=3).state_dict(), path)
    return path


def deit_args(data, teacher_ckpt, out, *extra):
    """The DeiT-Ti recipe, made tiny by overrides: a small RegNetY teacher, 32x32 images, one
    epoch of 4 batches of 6."""
    return [
        "--recipe", "imagenet_regnety160_deit_tiny", "--data-path", str(data),
        "--teacher", "regnety_002", "--teacher-ckpt", str(teacher_ckpt), "--image-size", "32",
        "--batch-size", "6", "--epochs", "1", "--workers", "0", "--log-every", "1",
        "--progress", "false", "--output-dir", str(out), *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("method", ["mokd", "sum"])
def test_deit_recipe_through_timm(
    tk, data, regnet_teacher, tmp_path, method, one_thread, timm_calls
):
    """One epoch of the RegNetY-160 -> DeiT-Ti recipe path with timm models: DeiT tokens
    against RegNet feature maps through the projector, the recipe's AdamW, DeiT augmentation,
    mixup/cutmix, repeated augmentation and drop path."""
    out = tmp_path / method
    result = tk.main(deit_args(data, regnet_teacher, out, "--method", method))
    assert result["finished"]

    # timm built both models with random weights (the teacher's came from the file)
    assert sorted(name for name, _, _ in timm_calls) == ["deit_tiny_patch16_224", "regnety_002"]
    assert not any(pretrained for _, pretrained, _ in timm_calls)
    student = result["student"]
    assert isinstance(student, timm.models.VisionTransformer)
    assert student.pos_embed.shape[1] == 1 + (32 // 16) ** 2  # built for 32x32: 4 patches + CLS
    assert student.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)  # the recipe's

    config = json.loads((out / "config.json").read_text())
    recipe = tk.RECIPES["imagenet_regnety160_deit_tiny"]
    for key in ("student", "optimizer", "lr", "weight_decay", "schedule", "warmup_epochs",
                "augment", "mixup", "cutmix", "label_smoothing", "repeated_aug", "drop_path",
                "features"):  # fmt: skip
        assert config[key] == recipe[key], key
    assert (config["optimizer"], config["lr"], config["weight_decay"]) == ("adamw", 1e-3, 0.05)
    assert config["recipe_overrides"] == {
        "teacher": ["regnety_160", "regnety_002"],
        "epochs": [300, 1],
        "batch_size": [1024, 6],
        "image_size": [224, 32],
    }
    assert config["method"] == method and config["effective_batch"] == 6
    assert config["objectives"] == ["ce", "kd", "feature"]
    assert config["timm"] == timm.__version__

    (row,) = read_csv(out / "metrics.csv")
    assert row["epoch"] == "1"
    for key in ("loss_ce", "loss_kd", "loss_feature"):
        assert math.isfinite(float(row[key])), key
    assert float(row["lr"]) == pytest.approx(1e-6)  # the first of 5 warm-up epochs (DeiT)
    diag = read_csv(out / "diagnostics.csv")
    assert len(diag) == 4  # 24 images / batch 6, repeated augmentation keeps the length
    weights = as_floats(diag, "weight_")
    assert weights.shape == (4, 3) and torch.isfinite(weights).all()
    if method == "sum":  # the recipe's fixed weights are applied to the losses
        assert (weights == 1.0).all()
    else:
        assert (weights != 1.0).any()

    # the shipped student is a plain timm DeiT: it loads into one built by timm alone
    plain = timm.create_model("deit_tiny_patch16_224", num_classes=3, img_size=32)
    plain.load_state_dict(torch.load(out / "student_final.pth", weights_only=True))


def test_timm_feature_stages(tk):
    """The projector's inputs on the DeiT path: DeiT's last block (tokens, CLS dropped, as a
    patch grid) against the RegNet's last stage (a map), the stage names read from timm."""
    torch.manual_seed(0)
    student = tk.build_model("deit_tiny_patch16_224", 3, image_size=32)
    teacher = gradbal.FrozenTeacher(tk.build_model("regnety_002", 3))
    assert tk.feature_stage("deit_tiny_patch16_224", student) == "blocks.11"
    assert tk.feature_stage("regnety_002", teacher.module) == "s4"  # from timm's feature_info
    assert tk.feature_stage("regnety_160") == "s4"
    cfg = {"student": "deit_tiny_patch16_224", "teacher": "regnety_002"}
    pair = tk.FeaturePair(student, teacher, cfg)
    x = torch.randn(2, 3, 32, 32)
    student(x)
    teacher(x)
    zs, zt = pair.pop()
    assert zs.shape == (2, 192, 2, 2) and zt.shape == (2, 368, 1, 1)
    proj = gradbal.SubspaceProjector.from_features(zs, zt)
    assert torch.isfinite(proj(zs, zt))


def test_timm_teacher_errors(tk, data, regnet_teacher, tmp_path, one_thread, timm_calls):
    """On the timm path: a teacher checkpoint of the wrong architecture is refused before any
    training, and a named pretrained teacher is checked before anything downloads."""
    args = deit_args(data, regnet_teacher, tmp_path / "e", "--method", "sum")

    def expect(extra, match, base=args):
        with pytest.raises(tk.ConfigError, match=match):
            tk.main(base + extra)

    wrong = tmp_path / "regnety_004.pth"
    torch.save(timm.create_model("regnety_004", num_classes=3).state_dict(), wrong)
    expect(["--teacher-ckpt", str(wrong)],
           r"does not fit architecture 'regnety_002' with 3 classes: .* [1-9]\d* shape mismatches "
           r".*Check --teacher and the checkpoint")  # fmt: skip
    deit = tmp_path / "deit.pth"
    torch.save(tk.build_model("deit_tiny_patch16_224", 3, image_size=32).state_dict(), deit)
    expect(["--teacher-ckpt", str(deit)], r"does not fit architecture 'regnety_002'.* missing")
    assert not (tmp_path / "e" / "metrics.csv").exists()

    no_ckpt = [a for a in args if a not in ("--teacher-ckpt", str(regnet_teacher))]
    expect(["--teacher-pretrained", "timm"], "predict 1000 classes, the data has 3", no_ckpt)
    expect(["--teacher-pretrained", "timm:nope"], r"no such weights.*regnety_002\.pycls_in1k",
           no_ckpt)  # fmt: skip
    expect(["--teacher", "regnety_02"], r"unknown model 'regnety_02'; did you mean .*regnety_002")
    assert not any(pretrained for _, pretrained, _ in timm_calls)  # nothing was downloaded
