"""examples/classification/train_kd.py on a tiny generated ImageFolder (nothing downloaded)."""

import csv
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_one_epoch(tk, data, teacher_ckpt, tmp_path, amp):
    out = tmp_path / amp
    extra = ["--method", "mokd", "--features", "true", "--epochs", "1", "--amp", amp]
    result = tk.main(base_args(data, teacher_ckpt, out, *extra, "--teacher-dtype", "bf16"))
    assert result["finished"]
    assert all(torch.isfinite(p).all() for p in result["student"].parameters())


def test_resume_equals_uninterrupted(tk, data, teacher_ckpt, tmp_path):
    common = ["--method", "mokd", "--features", "true", "--epochs", "3"]
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


def test_two_processes_under_torchrun(data, teacher_ckpt, tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    if not Path(torchrun).exists():
        pytest.skip("torchrun not found")
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [
        torchrun, "--standalone", "--nproc_per_node", "2", str(SCRIPT),
        *base_args(data, teacher_ckpt, out, "--method", "mokd", "--features", "true",
                   "--epochs", "1"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2
    assert config["per_process_batch"] == 3 and config["effective_batch"] == 6
    assert (out / "student_final.pth").is_file()


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
