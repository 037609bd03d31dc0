"""Knowledge distillation for image classification with gradbal: one script, published recipes.

ImageNet-1K (ImageFolder layout: DATA/train/<class>/*, DATA/val/<class>/*), CIFAR-100
(torchvision's folder layout, never downloaded) and scikit-learn's digits. ``--recipe`` selects
a published protocol (sources next to each entry of RECIPES); any flag overrides a recipe value.
``--method`` takes any gradbal method; ``sum`` applies the recipe's fixed loss weights
(classic KD, e.g. 0.5 CE + 0.5 KD), so the same script produces both columns of a comparison;
``scratch`` trains the student on cross-entropy alone (also how to train a teacher).

    # one GPU / CPU
    python examples/classification/train_kd.py --recipe cifar100_r32x4_r8x4 --method mokd \\
        --data-path ~/data/cifar100 --teacher-ckpt ~/ckpt/resnet32x4.pth
    # 8 GPUs on one machine (the batch size is the total, split across processes)
    torchrun --nproc_per_node 8 examples/classification/train_kd.py --recipe imagenet_r34_r18 \\
        --method mokd --data-path /data/imagenet --teacher-ckpt resnet34.pth --amp bf16
    # DeiT-Ti from DeiT's RegNetY-160 through timm (teacher saved from regnety_160.deit_in1k)
    torchrun --nproc_per_node 8 examples/classification/train_kd.py \\
        --recipe imagenet_regnety160_deit_tiny --method mokd --data-path /data/imagenet \\
        --teacher-ckpt regnety_160_deit.pth --amp bf16
    # resume after an interruption (atomic checkpoints; continues as if it never stopped)
    ... same command ... --resume

Distributed: under torchrun the optimizer is built with ``process_group=dist.group.WORLD`` and
``opt.backward`` runs inside ``DistributedDataParallel.no_sync()``: every objective's gradient
(and loss value) is averaged across processes *before* the Gram matrix, so every process
computes the same weights, the ones one process would compute on the whole batch. With a
per-sample normalisation (GroupNorm, LayerNorm) the run equals the one-process run on the same
total batch (tested); BatchNorm normalises over each process's shard, as in any DDP run.
Loss-based methods (famo, uw, dwa, rlw, mokd_amortized) do one backward of the weighted sum:
the script averages their loss values across processes first (so the weights agree) and the
gradient after. Each epoch checks that the processes still hold identical parameters
(``replica_max_diff`` in metrics.csv).

Outputs in ``--output-dir``: ``config.json`` (the resolved config with world size, effective
batch and learning rate), ``metrics.csv`` (per epoch: losses, top-1/top-5, lr, time),
``diagnostics.csv`` (every ``--log-every`` steps: losses, weights, gradient norms and cosines),
TensorBoard events when tensorboard is installed, ``checkpoint.pth`` (written to a temporary
file, then renamed) and ``student_final.pth`` (the student alone: the projector is
training-only).
"""

from __future__ import annotations

import argparse
import ast
import csv
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import MODELS, build_model, feature_stage, timm_kwargs

import gradbal

# ----------------------------------------------------------------------------- recipes
# Every value a recipe sets can be overridden by the flag of the same name.
RECIPES: dict[str, dict] = {
    # mdistiller ImageNet protocol (github.com/megvii-research/mdistiller,
    # configs/imagenet/r34_r18/kd.yaml; used by DKD, CVPR 2022, and DOT, ICCV 2023):
    # SGD 0.9, wd 1e-4, 100 epochs, batch 512, lr 0.2, x0.1 at 30/60/90, T = 1, 0.5 CE + 0.5 KD.
    # Published: teacher 73.31, student 69.76, KD 70.66 (71.03 re-run) top-1.
    "imagenet_r34_r18": {
        "dataset": "imagefolder", "teacher": "resnet34", "student": "resnet18",
        "epochs": 100, "batch_size": 512, "lr": 0.2, "optimizer": "sgd", "weight_decay": 1e-4,
        "schedule": "step", "milestones": [30, 60, 90], "temperature": 1.0,
        "loss_weights": [0.5, 0.5], "image_size": 224, "augment": "imagenet",
    },
    # mdistiller configs/imagenet/r50_mv1/kd.yaml: the same protocol; "MobileNet" is V1.
    # Published: teacher 76.16, student 68.87, KD 68.58 (70.50 re-run) top-1.
    "imagenet_r50_mv1": {
        "dataset": "imagefolder", "teacher": "resnet50", "student": "mobilenetv1",
        "epochs": 100, "batch_size": 512, "lr": 0.2, "optimizer": "sgd", "weight_decay": 1e-4,
        "schedule": "step", "milestones": [30, 60, 90], "temperature": 1.0,
        "loss_weights": [0.5, 0.5], "image_size": 224, "augment": "imagenet",
    },
    # DTO-KD (Hayder et al., ICLR 2026) as reported second-hand (docs/MOKD.md s.5): the DeiT
    # recipe, 300 epochs, teacher RegNetY-160 (82.6), feature KD through the projector.
    # Published: DeiT-Ti 79.7 top-1 (VkD 78.3). The DeiT recipe (Touvron et al. 2021;
    # github.com/facebookresearch/deit main.py defaults): AdamW, lr 5e-4 x 1024/512 = 1e-3,
    # wd 0.05, batch 1024, cosine to 1e-5 after 5 linear warm-up epochs from 1e-6 (timm's
    # per-epoch scheduler), RandAugment rand-m9-mstd0.5-inc1 + random erasing 0.25 (timm's
    # create_transform, bicubic), mixup 0.8 / cutmix 1.0 (switch 0.5, per batch), label
    # smoothing 0.1, repeated augmentation x3 (RASampler), drop path 0.1. Not reproduced:
    # DeiT's model EMA. The KD temperature and weights of DTO-KD are not known (T = 1, 0.5/0.5).
    "imagenet_regnety160_deit_tiny": {
        "dataset": "imagefolder", "teacher": "regnety_160", "student": "deit_tiny_patch16_224",
        "epochs": 300, "batch_size": 1024, "lr": 1e-3, "optimizer": "adamw",
        "weight_decay": 0.05, "schedule": "cosine", "warmup_epochs": 5, "warmup_lr": 1e-6,
        "min_lr": 1e-5, "temperature": 1.0, "loss_weights": [0.5, 0.5], "image_size": 224,
        "augment": "deit", "mixup": 0.8, "cutmix": 1.0, "label_smoothing": 0.1,
        "repeated_aug": 3, "drop_path": 0.1, "features": True,
    },
    # Same, DeiT-S. Published: 83.1 top-1 (VkD 82.3).
    "imagenet_regnety160_deit_small": {
        "dataset": "imagefolder", "teacher": "regnety_160", "student": "deit_small_patch16_224",
        "epochs": 300, "batch_size": 1024, "lr": 1e-3, "optimizer": "adamw",
        "weight_decay": 0.05, "schedule": "cosine", "warmup_epochs": 5, "warmup_lr": 1e-6,
        "min_lr": 1e-5, "temperature": 1.0, "loss_weights": [0.5, 0.5], "image_size": 224,
        "augment": "deit", "mixup": 0.8, "cutmix": 1.0, "label_smoothing": 0.1,
        "repeated_aug": 3, "drop_path": 0.1, "features": True,
    },
    # mdistiller CIFAR-100 (configs/cifar100/kd.yaml + mdistiller/engine/cfg.py defaults, the
    # CRD protocol): 240 epochs, batch 64, SGD lr 0.05, x0.1 at 150/180/210, wd 5e-4, T = 4,
    # 0.1 CE + 0.9 KD. Published (CRD / DKD tables): teacher 79.42, student 72.50, KD 73.33.
    "cifar100_r32x4_r8x4": {
        "dataset": "cifar100", "teacher": "resnet32x4", "student": "resnet8x4",
        "epochs": 240, "batch_size": 64, "lr": 0.05, "optimizer": "sgd", "weight_decay": 5e-4,
        "schedule": "step", "milestones": [150, 180, 210], "temperature": 4.0,
        "loss_weights": [0.1, 0.9], "image_size": 32, "augment": "cifar",
    },
    # Same protocol. Published: teacher 75.61, student 73.26, KD 74.92.
    "cifar100_wrn40_2_wrn16_2": {
        "dataset": "cifar100", "teacher": "wrn_40_2", "student": "wrn_16_2",
        "epochs": 240, "batch_size": 64, "lr": 0.05, "optimizer": "sgd", "weight_decay": 5e-4,
        "schedule": "step", "milestones": [150, 180, 210], "temperature": 4.0,
        "loss_weights": [0.1, 0.9], "image_size": 32, "augment": "cifar",
    },
    # scikit-learn's digits (examples/quickstart.py's setting with all 898 training images):
    # minutes on a CPU. Train the teacher first with --method scratch --student cnn32.
    "digits": {
        "dataset": "digits", "teacher": "cnn32", "student": "cnn4", "epochs": 30,
        "batch_size": 32, "lr": 0.2, "optimizer": "sgd", "weight_decay": 5e-4,
        "schedule": "cosine", "temperature": 4.0, "loss_weights": [0.5, 0.5],
        "image_size": 8, "augment": "shift",
    },
}  # fmt: skip

# Values used when neither the recipe nor a flag sets them.
DEFAULTS = {
    "recipe": None, "dataset": None, "data_path": None, "teacher": None, "student": None,
    "epochs": 10, "batch_size": 64, "lr": 0.1, "optimizer": "sgd", "momentum": 0.9,
    "weight_decay": 0.0, "schedule": "step", "milestones": [], "gamma": 0.1,
    "warmup_epochs": 0, "warmup_lr": 0.0, "min_lr": 0.0, "temperature": 1.0,
    "loss_weights": None, "image_size": 32, "augment": "none", "mixup": 0.0, "cutmix": 0.0,
    "mixup_switch_prob": 0.5, "label_smoothing": 0.0, "repeated_aug": 1, "drop_path": 0.0,
    "features": False, "method": "mokd", "method_options": {},
    "gram_params": None, "amp": None, "workers": 4, "seed": 0, "log_every": 20,
    "output_dir": None, "teacher_ckpt": None, "teacher_pretrained": None,
    "teacher_dtype": None, "resume": None, "stop_after_epochs": None, "eval_batch_size": None,
    "tensorboard": True, "progress": True, "compile_method": False, "graph_method": False,
}  # fmt: skip

EXTRA_METHODS = ("scratch",)


class ConfigError(ValueError):
    """A problem with the command line, the data or a checkpoint (reported without a trace)."""


# ----------------------------------------------------------------------------- config
def _floats(s: str) -> list[float]:
    return [float(v) for v in s.split(",") if v.strip()]


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v.strip()]


def _options(s: str) -> dict:
    out = {}
    for item in s.split(","):
        if not item.strip():
            continue
        if "=" not in item:
            raise argparse.ArgumentTypeError(f"method option {item!r} is not key=value")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {s!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    a = p.add_argument
    # Every default is None: a flag given on the command line overrides the recipe.
    a("--recipe", help=f"one of {sorted(RECIPES)}")
    a("--dataset", choices=["imagefolder", "cifar100", "digits"])
    a("--data-path", help="ImageFolder root (with train/ and val/) or CIFAR-100 root")
    a("--teacher", help=f"teacher architecture ({', '.join(MODELS)})")
    a("--student", help="student architecture")
    a("--teacher-ckpt", help="local teacher checkpoint (state dict, or a dict with 'model')")
    a(
        "--teacher-pretrained",
        help="named pretrained teacher weights: a torchvision enum name (IMAGENET1K_V1), "
        "'timm' (timm's default) or 'timm:TAG' (DeiT's RegNetY-160: timm:deit_in1k); the only "
        "download, and only when asked",
    )
    a("--teacher-dtype", choices=["bf16", "fp16"], help="run the frozen teacher in 16 bits")
    a("--method", help=f"a gradbal method ({', '.join(gradbal.available_methods())}) or scratch")
    a("--method-options", type=_options, help="e.g. magnitude=faithful,max_norm=1.0")
    a("--gram-params", choices=["all", "shared"])
    a("--loss-weights", type=_floats, help="fixed weights for --method sum: CE,KD[,feature]")
    a("--features", type=_bool, help="add the SubspaceProjector feature objective (true/false)")
    a("--temperature", type=float)
    a("--epochs", type=int)
    a("--batch-size", type=int, help="total batch over all processes (the published one)")
    a("--eval-batch-size", type=int)
    a("--lr", type=float)
    a("--optimizer", choices=["sgd", "adamw"])
    a("--momentum", type=float)
    a("--weight-decay", type=float)
    a("--schedule", choices=["step", "cosine"])
    a("--milestones", type=_ints)
    a("--gamma", type=float)
    a("--warmup-epochs", type=int)
    a("--warmup-lr", type=float, help="cosine: the lr of the first warm-up epoch (DeiT: 1e-6)")
    a("--min-lr", type=float, help="cosine: the lr it decays to (DeiT: 1e-5)")
    a("--image-size", type=int)
    a("--augment", choices=["imagenet", "cifar", "deit", "shift", "none"])
    a("--mixup", type=float, help="mixup alpha (0: off; DeiT: 0.8)")
    a("--cutmix", type=float, help="cutmix alpha (0: off; DeiT: 1.0)")
    a("--mixup-switch-prob", type=float, help="with both on, the chance of cutmix (0.5)")
    a("--label-smoothing", type=float, help="of the cross-entropy targets (DeiT: 0.1)")
    a("--repeated-aug", type=int, help="repeated augmentation: copies of each image (DeiT: 3)")
    a("--drop-path", type=float, help="stochastic depth of a timm student (DeiT: 0.1)")
    a("--amp", choices=["bf16", "fp16"])
    a("--workers", type=int)
    a("--seed", type=int)
    a("--log-every", type=int)
    a("--output-dir")
    a(
        "--resume",
        nargs="?",
        const="auto",
        help="resume from PATH, or (no value) from OUTPUT_DIR/checkpoint.pth when it exists",
    )
    a(
        "--stop-after-epochs",
        type=int,
        help="leave after this many epochs in this run (preemptible jobs; then --resume)",
    )
    a("--tensorboard", type=_bool)
    a("--progress", type=_bool, help="tqdm progress bar (when installed)")
    a(
        "--compile-method",
        type=_bool,
        help="run the method's K x K stage through gradbal.compile_method (torch.compile; a "
        "CUDA graph on GPU): pays for long runs at K >= 4 or with many-op methods",
    )
    a(
        "--graph-method",
        type=_bool,
        help="replay the method's K x K stage from a CUDA graph (gradbal.graph_method; no "
        "compile time; methods with no state and no random draws; the plain method on CPU)",
    )
    return p  # fmt: skip


def resolve_config(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None}
    cfg = dict(DEFAULTS)
    recipe = given.get("recipe")
    if recipe is not None:
        if recipe not in RECIPES:
            raise ConfigError(f"unknown recipe {recipe!r}; choose from {sorted(RECIPES)}")
        cfg.update(RECIPES[recipe])
    cfg.update(given)
    # Where this run departs from the published protocol: {key: [recipe value, this run's]},
    # saved in config.json next to the results.
    cfg["recipe_overrides"] = {
        k: [v, cfg[k]] for k, v in RECIPES.get(recipe, {}).items() if cfg[k] != v
    }
    for key in ("dataset", "teacher", "student"):
        if cfg[key] is None:
            raise ConfigError(f"no {key}: pass --recipe or --{key}")
    method = cfg["method"]
    if method not in EXTRA_METHODS and method not in gradbal.available_methods():
        raise ConfigError(
            f"unknown method {method!r}; choose from {gradbal.available_methods()} or 'scratch'"
        )
    if method != "scratch":
        try:  # options are checked now, not after the data has loaded
            checked = gradbal.get_method(method, **cfg["method_options"])
        except (TypeError, ValueError) as e:
            raise ConfigError(f"method {method!r}: {e}") from None
        if cfg["graph_method"] and cfg["compile_method"]:
            raise ConfigError("pass --graph-method or --compile-method, not both")
        if cfg["graph_method"]:
            try:
                gradbal.graph_method(checked)
            except ValueError as e:  # stateful or random: names compile_method instead
                raise ConfigError(f"--graph-method: {e} (--compile-method true)") from None
    if cfg["dataset"] in ("imagefolder", "cifar100") and not cfg["data_path"]:
        raise ConfigError(f"dataset {cfg['dataset']!r} needs --data-path")
    if cfg["output_dir"] is None:
        name = f"{recipe or cfg['student']}-{method}"
        cfg["output_dir"] = str(Path("runs") / "train_kd" / name)
    for key in ("mixup", "cutmix", "label_smoothing", "drop_path", "warmup_lr", "min_lr"):
        if cfg[key] < 0:
            raise ConfigError(f"--{key.replace('_', '-')} must be >= 0, got {cfg[key]}")
    if not 0 <= cfg["mixup_switch_prob"] <= 1 or cfg["label_smoothing"] >= 1:
        raise ConfigError("--mixup-switch-prob must be in [0, 1] and --label-smoothing below 1")
    if cfg["repeated_aug"] < 1:
        raise ConfigError(f"--repeated-aug must be >= 1, got {cfg['repeated_aug']}")
    n_obj = 3 if cfg["features"] else 2
    if cfg["loss_weights"] is None:
        cfg["loss_weights"] = [0.5, 0.5]
    if len(cfg["loss_weights"]) == 2 and n_obj == 3:
        cfg["loss_weights"] = [*cfg["loss_weights"], 1.0]
    if len(cfg["loss_weights"]) != n_obj:
        raise ConfigError(f"--loss-weights needs {n_obj} values (CE, KD[, feature])")
    return cfg


# ----------------------------------------------------------------------------- distributed
def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device) from torchrun's environment; (0, 1, ...) without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
            dist.init_process_group("nccl")
            device = torch.device("cuda", local)
        else:
            dist.init_process_group("gloo")
            device = torch.device("cpu")
        return dist.get_rank(), world, device
    return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")


def all_reduce_mean_grads(params: list[torch.Tensor], world: int) -> None:
    """Average ``.grad`` across processes with one flat all-reduce (loss-based methods)."""
    grads = [p.grad for p in params if p.grad is not None]
    if world == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def with_global_values(losses: list[torch.Tensor], world: int) -> list[torch.Tensor]:
    """Losses whose values are the averages over processes and whose gradients are local.

    For loss-based methods, whose weights are read from the loss values alone: every process
    then computes the same weights (and method state). ``v + (l - l.detach())`` has the value
    ``v`` exactly on every process (``l - l`` is exactly 0) and the gradient of ``l``.
    """
    values = torch.stack([loss.detach().float() for loss in losses])
    dist.all_reduce(values)
    values /= world
    return [v.to(loss.dtype) + (loss - loss.detach()) for v, loss in zip(values, losses)]


@torch.no_grad()
def replica_max_diff(params: list[torch.Tensor]) -> float:
    """Largest difference between any process's parameters and process 0's (0.0 expected)."""
    flat = torch.cat([p.detach().reshape(-1).float() for p in params])
    ref = flat.clone()
    dist.broadcast(ref, 0)
    diff = (flat - ref).abs().max().reshape(1)
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return diff.item()


# ----------------------------------------------------------------------------- data
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)


class DigitsDataset(torch.utils.data.Dataset):
    """scikit-learn's digits, the quickstart's fixed stratified half/half split."""

    def __init__(self, train: bool, augment: bool) -> None:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        x, y = load_digits(return_X_y=True)
        x = (x / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
        x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.5, stratify=y, random_state=0)
        mean, std = x_tr.mean(), x_tr.std()
        x, y = (x_tr, y_tr) if train else (x_te, y_te)
        self.x = torch.as_tensor((x - mean) / std)
        self.y = torch.as_tensor(y, dtype=torch.long)
        self.augment = augment
        self.classes = [str(i) for i in range(10)]

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        x = self.x[i]
        if self.augment:  # shift by up to one pixel
            dx, dy = torch.randint(0, 3, (2,)).tolist()
            x = F.pad(x, (1, 1, 1, 1))[:, dy : dy + 8, dx : dx + 8]
        return x, self.y[i]


def _transforms(cfg: dict, train: bool, mean, std):
    from torchvision import transforms as T

    size = cfg["image_size"]
    aug = cfg["augment"]
    norm = [T.ToTensor(), T.Normalize(mean, std)]
    if aug == "deit" and train:
        try:
            from timm.data import create_transform
        except ImportError:
            raise ConfigError("--augment deit needs timm: pip install timm") from None
        return create_transform(
            size, is_training=True, auto_augment="rand-m9-mstd0.5-inc1",
            interpolation="bicubic", re_prob=0.25, mean=mean, std=std,
        )  # fmt: skip
    if aug in ("imagenet", "deit"):
        if train:
            return T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), *norm])
        # DeiT evaluates with bicubic resizing (its datasets.py), torchvision's reference bilinear
        mode = T.InterpolationMode.BICUBIC if aug == "deit" else T.InterpolationMode.BILINEAR
        resize = T.Resize(int(size * 256 / 224), interpolation=mode)
        return T.Compose([resize, T.CenterCrop(size), *norm])
    if aug == "cifar" and train:
        return T.Compose([T.RandomCrop(size, padding=4), T.RandomHorizontalFlip(), *norm])
    return T.Compose([T.Resize((size, size)), *norm]) if aug == "none" else T.Compose(norm)


def build_datasets(cfg: dict):
    """(train, val, num_classes, in_channels); never downloads."""
    kind = cfg["dataset"]
    if kind == "digits":
        return DigitsDataset(True, cfg["augment"] == "shift"), DigitsDataset(False, False), 10, 1
    import torchvision

    root = Path(cfg["data_path"]).expanduser()
    if not root.is_dir():
        raise ConfigError(f"--data-path {str(root)!r} does not exist or is not a directory")
    if kind == "cifar100":
        tr = _transforms(cfg, True, CIFAR100_MEAN, CIFAR100_STD)
        te = _transforms(cfg, False, CIFAR100_MEAN, CIFAR100_STD)
        try:
            train = torchvision.datasets.CIFAR100(root, train=True, transform=tr, download=False)
            val = torchvision.datasets.CIFAR100(root, train=False, transform=te, download=False)
        except RuntimeError as e:
            raise ConfigError(
                f"CIFAR-100 not found under {str(root)!r} ({e}). This script never downloads: "
                "fetch it once with torchvision.datasets.CIFAR100(ROOT, download=True)"
            ) from None
        return train, val, 100, 3
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise ConfigError(
                f"ImageFolder layout expected: {str(root / split)!r} is missing "
                "(DATA/train/<class>/*.jpg and DATA/val/<class>/*.jpg)"
            )
    train = torchvision.datasets.ImageFolder(
        root / "train", _transforms(cfg, True, IMAGENET_MEAN, IMAGENET_STD)
    )
    val = torchvision.datasets.ImageFolder(
        root / "val", _transforms(cfg, False, IMAGENET_MEAN, IMAGENET_STD)
    )
    if train.classes != val.classes:
        raise ConfigError(
            f"train/ and val/ have different classes ({len(train.classes)} vs "
            f"{len(val.classes)}); they must list the same class folders"
        )
    return train, val, len(train.classes), 3


class MixupCutmix:
    """Mixup / CutMix of a batch with label smoothing: timm's ``Mixup`` in the mode DeiT uses.

    Per batch: ``lam ~ Beta(alpha, alpha)``; with both on, CutMix with probability
    ``switch_prob``; the batch is mixed with itself reversed (mixup: ``lam x + (1 - lam) x'``;
    CutMix: a box of area ``1 - lam`` pasted from ``x'``, ``lam`` then corrected to the box's
    real area). Targets: ``lam y + (1 - lam) y'`` of one-hot vectors smoothed to
    ``1 - s + s/C`` and ``s/C``. Draws from numpy's global RNG (seeded per process, saved in
    checkpoints), as timm does. The teacher sees the mixed images too (as in DeiT).
    """

    def __init__(self, mixup: float, cutmix: float, switch_prob: float, smoothing: float,
                 num_classes: int) -> None:  # fmt: skip
        self.mixup, self.cutmix = mixup, cutmix
        self.switch_prob, self.smoothing, self.num_classes = switch_prob, smoothing, num_classes

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        use_cutmix = self.cutmix > 0 and (self.mixup <= 0 or np.random.rand() < self.switch_prob)
        alpha = self.cutmix if use_cutmix else self.mixup
        lam = float(np.random.beta(alpha, alpha))
        if use_cutmix:
            (y0, y1, x0, x1), lam = self.box(x.shape[-2:], lam)
            x = x.clone()
            x[..., y0:y1, x0:x1] = x.flip(0)[..., y0:y1, x0:x1]
        else:
            x = x * lam + x.flip(0) * (1.0 - lam)
        return x, self.targets(y, lam)

    @staticmethod
    def box(shape, lam: float):
        """timm's ``rand_bbox`` + ``cutmix_bbox_and_lam(correct_lam=True)``."""
        h, w = shape
        ratio = math.sqrt(1.0 - lam)
        cut_h, cut_w = int(h * ratio), int(w * ratio)
        cy, cx = np.random.randint(0, h), np.random.randint(0, w)
        y0, y1 = np.clip(cy - cut_h // 2, 0, h), np.clip(cy + cut_h // 2, 0, h)
        x0, x1 = np.clip(cx - cut_w // 2, 0, w), np.clip(cx + cut_w // 2, 0, w)
        lam = 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)
        return (int(y0), int(y1), int(x0), int(x1)), lam

    def targets(self, y: torch.Tensor, lam: float) -> torch.Tensor:
        off = self.smoothing / self.num_classes
        on = 1.0 - self.smoothing + off
        one_hot = torch.full((len(y), self.num_classes), off, device=y.device)
        one_hot.scatter_(1, y[:, None], on)
        return one_hot * lam + one_hot.flip(0) * (1.0 - lam)


class RepeatedAugSampler(torch.utils.data.Sampler):
    """DeiT's repeated augmentation (``RASampler``, facebookresearch/deit samplers.py).

    Each epoch: a permutation seeded by ``seed + epoch``, every index repeated ``repeats``
    times, dealt round-robin to the processes, so the copies of an image (each augmented
    differently) land on different processes; each process keeps ``n // world`` of its
    indices, so an epoch is as long as an ordinary one. (DeiT also rounds ``n`` down to a
    multiple of 256 first, which drops at most 255 images an epoch; not done here, so small
    sets work.)
    """

    def __init__(self, n: int, world: int, rank: int, repeats: int, seed: int) -> None:
        self.n, self.world, self.rank, self.repeats, self.seed = n, world, rank, repeats, seed
        self.epoch = 0
        self.per_process = math.ceil(n * repeats / world)
        self.selected = n // world

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = [
            i for i in torch.randperm(self.n, generator=g).tolist() for _ in range(self.repeats)
        ]
        total = self.per_process * self.world
        order += order[: total - len(order)]
        return iter(order[self.rank : total : self.world][: self.selected])

    def __len__(self) -> int:
        return self.selected


# ----------------------------------------------------------------------------- teacher
def _unwrap_state_dict(obj) -> dict:
    if isinstance(obj, dict):
        for key in ("student", "model", "state_dict", "model_state_dict"):
            if key in obj and isinstance(obj[key], dict):
                return _unwrap_state_dict(obj[key])
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError("the teacher checkpoint holds no state dict of tensors")
    prefixes = ("module.", "_orig_mod.")
    out = {}
    for k, v in obj.items():
        for pre in prefixes:
            k = k.removeprefix(pre)
        out[k] = v
    return out


def load_teacher(cfg: dict, num_classes: int, in_channels: int) -> nn.Module:
    """The teacher's weights from a local file (``--teacher-ckpt``), or named pretrained ones
    (``--teacher-pretrained``, the only download, and only when asked)."""
    arch = cfg["teacher"]
    if cfg["teacher_ckpt"] and cfg["teacher_pretrained"]:
        raise ConfigError("pass either --teacher-ckpt or --teacher-pretrained, not both")
    if cfg["teacher_pretrained"]:
        return _pretrained_teacher(arch, cfg["teacher_pretrained"], num_classes, cfg["image_size"])
    if not cfg["teacher_ckpt"]:
        raise ConfigError(
            "distillation needs a teacher: --teacher-ckpt PATH (a local file; nothing is "
            "downloaded) or --teacher-pretrained NAME. Train one with --method scratch."
        )
    path = Path(cfg["teacher_ckpt"]).expanduser()
    if not path.is_file():
        raise ConfigError(f"--teacher-ckpt {str(path)!r} does not exist")
    try:
        model = build_model(arch, num_classes, in_channels, image_size=cfg["image_size"])
    except ValueError as e:
        raise ConfigError(f"--teacher {arch!r}: {e}") from None
    state = _unwrap_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        raise ConfigError(
            f"teacher checkpoint {str(path)!r} does not fit architecture {arch!r} with "
            f"{num_classes} classes: {len(missing)} missing keys {missing[:3]}, "
            f"{len(unexpected)} unexpected {unexpected[:3]}, {len(mismatched)} shape "
            f"mismatches {mismatched[:3]}. Check --teacher and the checkpoint."
        )
    model.load_state_dict(state)
    return model


def _pretrained_teacher(arch: str, name: str, num_classes: int, image_size: int) -> nn.Module:
    """Named pretrained weights, downloaded by timm or torchvision.

    ``timm`` loads timm's default weights for ``arch``, ``timm:TAG`` a tagged set: the DeiT
    recipes' teacher is ``--teacher regnety_160 --teacher-pretrained timm:deit_in1k`` (DeiT's
    own RegNetY-160, 82.6%; timm's default for regnety_160 is another, ImageNet-12k-pretrained
    one). Any other NAME is a torchvision weights enum member (``IMAGENET1K_V1``). The class
    count is checked before anything is downloaded: a 1000-class head cannot teach a data set
    with another number of classes (timm would silently swap in a random head).
    """
    if name == "timm" or name.startswith("timm:"):
        try:
            import timm
        except ImportError:
            raise ConfigError(f"--teacher-pretrained {name}: timm is not installed") from None
        tag = name.partition(":")[2]
        if not timm.is_model(arch):
            raise ConfigError(f"--teacher-pretrained {name}: timm has no model {arch!r}")
        try:
            pretrained = timm.models.get_pretrained_cfg(f"{arch}.{tag}" if tag else arch)
        except RuntimeError:
            pretrained = None
        if pretrained is None or not (pretrained.hf_hub_id or pretrained.url):
            raise ConfigError(
                f"--teacher-pretrained {name}: timm has no such weights for {arch!r}; it has "
                f"{timm.list_pretrained(arch + '.*')} (pass the part after the dot as timm:TAG)"
            )
        _check_pretrained_classes(name, pretrained.num_classes, num_classes)
        return timm.create_model(
            f"{arch}.{pretrained.tag}" if pretrained.tag else arch,
            pretrained=True,
            **timm_kwargs(arch, image_size),
        )
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(arch)[name]
    except (ValueError, KeyError):
        raise ConfigError(
            f"--teacher-pretrained {name}: not a torchvision weights name for {arch!r} "
            "(e.g. IMAGENET1K_V1; 'timm' or 'timm:TAG' for timm's weights)"
        ) from None
    _check_pretrained_classes(name, len(weights.meta["categories"]), num_classes)
    return torchvision.models.get_model(arch, weights=weights)


def _check_pretrained_classes(name: str, pretrained: int, data: int) -> None:
    if pretrained != data:
        raise ConfigError(
            f"--teacher-pretrained {name}: those weights predict {pretrained} classes, the data "
            f"has {data}; use a data set with the same classes, or train a teacher on this one "
            "(--method scratch) and pass it with --teacher-ckpt"
        )


# ----------------------------------------------------------------------------- features
def to_map(z: torch.Tensor, prefix_tokens: int) -> torch.Tensor:
    """ViT tokens [B, T, C] -> [B, C, h, w] (prefix tokens dropped), to pair with a CNN map."""
    z = z[:, prefix_tokens:]
    side = math.isqrt(z.shape[1])
    if side * side != z.shape[1]:
        raise ConfigError(f"{z.shape[1]} patch tokens do not form a square grid")
    return z.transpose(1, 2).reshape(z.shape[0], z.shape[2], side, side)


class FeaturePair:
    """Student and teacher features of one stage each, made comparable for the projector.

    The stages are the models' last ones (``feature_stage``: ``blocks.11`` of a DeiT, ``s4`` of
    a RegNet). Two feature maps, or two token sequences, go to the projector as they are (it
    resizes a student map to the teacher's size); ViT tokens paired with a CNN map become a
    map first (:func:`to_map`), so the DeiT recipes compare the student's patch grid with the
    RegNet teacher's last map.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg: dict) -> None:
        # names and token counts are the wrapped model's (FrozenTeacher keeps it in .module)
        inner = teacher.module if isinstance(teacher, gradbal.FrozenTeacher) else teacher
        try:
            self.s_name = feature_stage(cfg["student"], student)
            self.t_name = feature_stage(cfg["teacher"], inner)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.student = gradbal.FeatureCapture(student, [self.s_name])
        self.teacher = gradbal.FeatureCapture(teacher, [self.t_name])
        self.s_prefix = getattr(student, "num_prefix_tokens", 0)
        self.t_prefix = getattr(inner, "num_prefix_tokens", 0)

    def pop(self):
        zs = self.student.pop()[self.s_name]
        zt = self.teacher.pop()[self.t_name]
        if zs.ndim == 3 and zt.ndim == 4:
            zs = to_map(zs, self.s_prefix)
        elif zs.ndim == 4 and zt.ndim == 3:
            zt = to_map(zt, self.t_prefix)
        return zs, zt


# ----------------------------------------------------------------------------- checkpoints
def atomic_save(obj, path: Path) -> None:
    """Write to a temporary file in the same folder, then rename: a crash never leaves a
    half-written checkpoint where the resume looks."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        # Durable, not only atomic: without an fsync the rename can reach the disk before the
        # data, and a power loss or kernel crash then leaves an empty or truncated file under
        # the checkpoint's name (the previous one gone). A process death (SIGKILL, OOM killer)
        # needs none of this: the page cache outlives the process.
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    # The rename lives in the folder: fsync it too, or after a power loss the name may still
    # point at the old file (or at none). POSIX only: Windows cannot open a folder for fsync.
    if os.name == "posix":
        fd = os.open(path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        except OSError as err:  # some filesystems (FUSE, SMB) refuse fsync on folders
            import errno

            if err.errno not in (errno.EINVAL, errno.ENOTSUP):
                raise
        finally:
            os.close(fd)


def rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


_MUST_MATCH = ("recipe", "dataset", "teacher", "student", "method", "features", "epochs",
               "batch_size", "loss_weights")  # fmt: skip


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: nn.Module, loader, device, world: int, amp_ctx) -> tuple[float, float]:
    """Top-1 and top-5 accuracy (%) over the whole validation set (shards summed)."""
    was = model.training
    model.eval()
    counts = torch.zeros(3, dtype=torch.float64, device=device)
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with amp_ctx():
            logits = model(x)
        k = min(5, logits.shape[1])
        top = logits.float().topk(k, dim=1).indices
        hit = top == y[:, None]
        counts += torch.stack(
            [hit[:, 0].sum(), hit.any(1).sum(), torch.tensor(len(y), device=device)]
        ).double()
    if world > 1:
        dist.all_reduce(counts)
    model.train(was)
    n = counts[2].clamp_min(1)
    return (100 * counts[0] / n).item(), (100 * counts[1] / n).item()


class _Shard(torch.utils.data.Sampler):
    """Every world-th index from rank on: no padding, so the summed counts are exact."""

    def __init__(self, n: int, rank: int, world: int) -> None:
        self.indices = list(range(rank, n, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


# ----------------------------------------------------------------------------- training
def main(argv=None) -> dict:
    cfg = resolve_config(argv)
    rank, world, device = init_distributed()
    try:
        return train(cfg, rank, world, device)
    finally:
        if world > 1 and dist.is_initialized():
            dist.barrier()  # nobody tears gloo down while a peer still talks to it
            dist.destroy_process_group()


def train(cfg: dict, rank: int, world: int, device: torch.device) -> dict:
    is_main = rank == 0
    out_dir = Path(cfg["output_dir"])
    if cfg["batch_size"] % world:
        raise ConfigError(
            f"--batch-size {cfg['batch_size']} (the total) is not divisible by the "
            f"{world} processes"
        )
    per_rank_batch = cfg["batch_size"] // world
    torch.manual_seed(cfg["seed"] + rank)
    np.random.seed(cfg["seed"] + rank)
    random.seed(cfg["seed"] + rank)

    train_set, val_set, num_classes, in_ch = build_datasets(cfg)
    method = cfg["method"]
    distill = method != "scratch"

    try:
        student = build_model(
            cfg["student"], num_classes, in_ch, cfg["drop_path"], image_size=cfg["image_size"]
        )
    except ValueError as e:
        raise ConfigError(f"--student {cfg['student']!r}: {e}") from None
    student = student.to(device)
    teacher = None
    if distill:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}[cfg["teacher_dtype"]]
        teacher = gradbal.FrozenTeacher(load_teacher(cfg, num_classes, in_ch).to(device), dtype)

    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}[cfg["amp"]]

    def amp_ctx():
        if amp_dtype is None:
            return nullcontext()
        return torch.autocast(device.type, dtype=amp_dtype)

    # Data: a seeded sampler per epoch, so a resumed run sees the same batches.
    if cfg["repeated_aug"] > 1:
        sampler = RepeatedAugSampler(len(train_set), world, rank, cfg["repeated_aug"], cfg["seed"])
    else:
        sampler = torch.utils.data.DistributedSampler(
            train_set, num_replicas=world, rank=rank, shuffle=True, seed=cfg["seed"],
            drop_last=True,
        )  # fmt: skip
    mix = None
    if cfg["mixup"] > 0 or cfg["cutmix"] > 0:
        mix = MixupCutmix(cfg["mixup"], cfg["cutmix"], cfg["mixup_switch_prob"],
                          cfg["label_smoothing"], num_classes)  # fmt: skip

    def cross_entropy(logits, target):
        if target.ndim == 2:  # mixed soft targets, already smoothed
            return F.cross_entropy(logits, target)
        return F.cross_entropy(logits, target, label_smoothing=cfg["label_smoothing"])

    loader_kw = {"num_workers": cfg["workers"], "pin_memory": device.type == "cuda"}
    train_loader = torch.utils.data.DataLoader(
        train_set, batch_size=per_rank_batch, sampler=sampler, drop_last=True, **loader_kw
    )
    val_loader = torch.utils.data.DataLoader(
        val_set,
        batch_size=cfg["eval_batch_size"] or per_rank_batch,
        sampler=_Shard(len(val_set), rank, world),
        # its own generator: evaluating never draws from the global RNG (exact resume)
        generator=torch.Generator().manual_seed(cfg["seed"]),
        **loader_kw,
    )
    if len(train_loader) == 0:
        raise ConfigError(
            f"{len(train_set)} training images make no batch of {per_rank_batch} per process; "
            "lower --batch-size"
        )

    # Objectives: CE, KD (and the projector's feature loss).
    projector, pair = None, None
    if distill and cfg["features"]:
        pair = FeaturePair(student, teacher, cfg)
        probe = next(iter(torch.utils.data.DataLoader(val_set, batch_size=2)))[0].to(device)
        student.eval()
        with torch.no_grad():
            student(probe)
            teacher(probe)
        student.train()
        zs, zt = pair.pop()
        projector = gradbal.SubspaceProjector.from_features(zs, zt).to(device)

    params = list(student.parameters()) + (list(projector.parameters()) if projector else [])
    if cfg["optimizer"] == "sgd":
        base = torch.optim.SGD(
            params, lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"]
        )
    else:
        base = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    opt = base
    loss_based = False
    if distill:
        balancer = gradbal.get_method(method, **cfg["method_options"])
        loss_based = not balancer.requires_task_gradients
        extra = {} if cfg["gram_params"] is None else {"gram_params": cfg["gram_params"]}
        if cfg["compile_method"]:
            balancer = gradbal.compile_method(balancer)
        elif cfg["graph_method"]:
            balancer = gradbal.graph_method(balancer)
        opt = gradbal.MultiObjectiveOptimizer(
            base,
            method=balancer,
            seed=cfg["seed"],  # the same on every process
            # Exact distributed balancing: each objective's gradient and loss value is averaged
            # over the processes before the Gram matrix (backward under DDP's no_sync below).
            process_group=dist.group.WORLD if world > 1 and not loss_based else None,
            **extra,
        )
    if cfg["schedule"] == "step":
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, cfg["milestones"], cfg["gamma"])
    else:
        warm, total = cfg["warmup_epochs"], cfg["epochs"]
        lo = cfg["min_lr"] / cfg["lr"]
        # without --warmup-lr the warm-up starts at lr / (warm-up epochs + 1)
        start = cfg["warmup_lr"] / cfg["lr"] if cfg["warmup_lr"] > 0 else 1 / (warm + 1)

        def factor(epoch: int) -> float:
            # timm's CosineLRScheduler per epoch (DeiT): linear warm-up from warmup_lr, then
            # cosine from lr to min_lr over all the epochs (warm-up ones included)
            if epoch < warm:
                return start + epoch * (1 - start) / warm
            return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * epoch / max(1, total)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    model = student
    if world > 1:
        model = nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None
        )
        if projector is not None:  # same initial projector on every process
            for t in projector.state_dict().values():
                dist.broadcast(t, 0)

    # Resume.
    start_epoch, history, resume_rng = 0, [], None
    ckpt_path = out_dir / "checkpoint.pth"
    resume = cfg["resume"]
    if resume is not None:
        path = ckpt_path if resume == "auto" else Path(resume).expanduser()
        if path.is_file():
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
            for key in _MUST_MATCH:
                if ckpt["config"].get(key) != cfg.get(key):
                    raise ConfigError(
                        f"cannot resume from {str(path)!r}: it was run with {key}="
                        f"{ckpt['config'].get(key)!r}, this run has {cfg.get(key)!r}"
                    )
            student.load_state_dict(ckpt["student"])
            if projector is not None:
                projector.load_state_dict(ckpt["projector"])
            opt.load_state_dict(ckpt["optimizer"])
            sched.load_state_dict(ckpt["scheduler"])
            scaler.load_state_dict(ckpt["scaler"])
            start_epoch, history = ckpt["epoch"], ckpt["history"]
            resume_rng = ckpt["rng"]
            if is_main:
                print(f"resumed from {path} after epoch {start_epoch}")
        elif resume != "auto":
            raise ConfigError(f"--resume {str(path)!r}: no such checkpoint")

    # The resolved config, with what reproducing it needs.
    run_info = {
        **cfg,
        "world_size": world,
        "per_process_batch": per_rank_batch,
        "effective_batch": per_rank_batch * world,
        "lr_used": cfg["lr"],
        "num_classes": num_classes,
        "device": str(device),
        "torch": torch.__version__,
        "gradbal": gradbal.__version__,
        "timm": _version("timm"),
        "objectives": ["ce", "kd", "feature"][: (3 if projector else 2)] if distill else ["ce"],
    }
    writer, diag_file, diag_writer = None, None, None
    if is_main:
        if cfg["recipe_overrides"]:
            changed = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in cfg["recipe_overrides"].items())
            print(f"recipe {cfg['recipe']} with overrides: {changed}")
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(run_info, indent=1, default=str))
        if cfg["tensorboard"]:
            try:
                from torch.utils.tensorboard import SummaryWriter

                writer = SummaryWriter(str(out_dir / "tb"))
            except ImportError:
                print("note: tensorboard is not installed; logging to CSV only")

    # The teacher is evaluated before any training, so a bad checkpoint shows at once.
    teacher_top1 = teacher_top5 = None
    if distill:
        teacher_top1, teacher_top5 = evaluate(teacher, val_loader, device, world, amp_ctx)
        if is_main:
            print(f"teacher {cfg['teacher']}: top-1 {teacher_top1:.2f}  top-5 {teacher_top5:.2f}")
            if teacher_top1 <= 100 * 1.5 / num_classes:
                print("warning: the teacher is near chance level; is --teacher-ckpt right?")

    # Restored last, right before training, so that nothing above (model building, the
    # teacher's evaluation) shifts the random stream a resumed run continues from.
    if resume_rng is not None:
        if len(resume_rng) == world:
            set_rng_state(resume_rng[rank])
        elif is_main:
            print(f"note: checkpoint from {len(resume_rng)} processes, now {world}: RNG reseeded")

    weights = torch.tensor(cfg["loss_weights"], device=device)
    fixed_weights = method == "sum"
    after_step = distill and opt.method.uses_losses_after_step

    def objectives(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        """[CE, KD(, feature)] of one batch; [CE] alone for scratch."""
        with amp_ctx():
            logits = net(x)
            if not distill:
                return [cross_entropy(logits, y)]
            t_logits = teacher(x)
            losses = [
                cross_entropy(logits, y),
                gradbal.kd_loss(logits, t_logits, cfg["temperature"]),
            ]
            if projector is not None:
                losses.append(projector(*pair.pop()))
        return losses

    def train_step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One optimizer step on one batch, for every --method (scratch, sum or a balancing
        method); returns the step's loss values (detached, float64), as logged."""
        # Distillation: K backward passes inside no_sync, or DDP's own all-reduce would fire
        # K times and mix the objectives; the optimizer averages each objective instead.
        # Scratch: one ordinary backward, which DDP averages.
        sync_ctx = model.no_sync() if distill and world > 1 else nullcontext()
        with sync_ctx:
            losses = objectives(model, x, y)
            if fixed_weights:
                losses = [w * loss for w, loss in zip(weights, losses)]
            if loss_based and world > 1:
                losses = with_global_values(losses, world)
            opt.zero_grad(set_to_none=True)
            if distill:
                opt.backward(losses, scaler=scaler if scaler.is_enabled() else None)
            else:
                scaler.scale(losses[0]).backward()
        if loss_based and world > 1:
            all_reduce_mean_grads(params, world)
        if scaler.is_enabled():
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        if after_step:
            # FAMO's published rule: the same batch's losses with the new parameters
            # (the model stays in train mode, as in FAMO's code); averaged over
            # processes so every process updates its weights alike.
            with torch.no_grad():
                after = torch.stack([v.float() for v in objectives(student, x, y)])
            if world > 1:
                dist.all_reduce(after)
                after /= world
            opt.update_after_step(after)
        return torch.stack([loss.detach().double() for loss in losses])

    step = start_epoch * len(train_loader)
    stopped_early = False
    for epoch in range(start_epoch, cfg["epochs"]):
        if cfg["stop_after_epochs"] is not None and epoch - start_epoch >= cfg["stop_after_epochs"]:
            stopped_early = True
            break
        sampler.set_epoch(epoch)
        student.train()
        t0 = time.time()
        epoch_lr = base.param_groups[0]["lr"]
        sums = torch.zeros(4, dtype=torch.float64, device=device)  # CE, KD, feature; steps
        bar = _progress(len(train_loader), f"epoch {epoch + 1}/{cfg['epochs']}", is_main, cfg)
        for x, y in train_loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if mix is not None:
                x, y = mix(x, y)
            vals = train_step(x, y)
            sums[: len(vals)] += vals
            sums[3] += 1
            if distill and is_main and step % cfg["log_every"] == 0:
                diag_file, diag_writer = _log_diagnostics(
                    out_dir, diag_file, diag_writer, writer, opt.last_stats, step, epoch,
                    base.param_groups[0]["lr"],
                )  # fmt: skip
            step += 1
            if bar is not None:
                bar.update()
        if bar is not None:
            bar.close()
        sched.step()
        if world > 1:
            dist.all_reduce(sums)
        mean = (sums[:3] / sums[3].clamp_min(1)).tolist()
        drift = replica_max_diff(params) if world > 1 else None
        if is_main and drift:
            print(f"warning: the processes' parameters differ by up to {drift:.3g}")
        top1, top5 = evaluate(student, val_loader, device, world, amp_ctx)
        row = {
            "epoch": epoch + 1,
            "lr": epoch_lr,
            "loss_ce": mean[0],
            "loss_kd": mean[1] if distill else None,
            "loss_feature": mean[2] if projector is not None else None,
            "top1": top1,
            "top5": top5,
            "seconds": time.time() - t0,
            "replica_max_diff": drift,
        }
        history.append(row)
        states = [rng_state()]
        if world > 1:
            states = [None] * world
            dist.all_gather_object(states, rng_state())
        if is_main:
            print(
                f"epoch {epoch + 1}/{cfg['epochs']}  top-1 {top1:.2f}  top-5 {top5:.2f}  "
                f"loss_ce {mean[0]:.4f}  ({row['seconds']:.1f}s)"
            )
            _append_csv(out_dir / "metrics.csv", row)
            if writer is not None:
                for k, v in row.items():
                    if v is not None and k != "epoch":
                        writer.add_scalar(f"epoch/{k}", v, epoch + 1)
            ckpt = {
                "epoch": epoch + 1,
                "student": student.state_dict(),
                "projector": projector.state_dict() if projector is not None else None,
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": states,
                "history": history,
                "config": cfg,
            }
            atomic_save(ckpt, ckpt_path)
    if diag_file is not None:
        diag_file.close()
    if writer is not None:
        writer.close()
    finished = not stopped_early and len(history) == cfg["epochs"]
    if is_main and finished:
        atomic_save(student.state_dict(), out_dir / "student_final.pth")
    return {
        "history": history,
        "teacher_top1": teacher_top1,
        "teacher_top5": teacher_top5,
        "finished": finished,
        "output_dir": str(out_dir),
        "student": student,
    }


def _version(package: str) -> str | None:
    """The installed version of ``package`` (for config.json), None when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _progress(total: int, desc: str, is_main: bool, cfg: dict):
    if not (is_main and cfg["progress"]):
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, leave=False)


def _append_csv(path: Path, row: dict) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)


def _log_diagnostics(out_dir, f, w, writer, stats, step, epoch, lr):
    """One row of losses, weights, gradient norms and pairwise cosines (one host sync)."""
    k = stats.losses.numel()
    row = {"step": step, "epoch": epoch + 1, "lr": lr}
    losses, weights = stats.losses.tolist(), stats.weights.tolist()
    norms = stats.norms.tolist() if stats.norms is not None else [float("nan")] * k
    cos = stats.cosines.tolist() if stats.cosines is not None else None
    for i in range(k):
        row[f"loss_{i}"] = losses[i]
        row[f"weight_{i}"] = weights[i]
        row[f"grad_norm_{i}"] = norms[i]
    for i in range(k):
        for j in range(i + 1, k):
            row[f"cos_{i}{j}"] = cos[i][j] if cos is not None else float("nan")
    if f is None:
        path = out_dir / "diagnostics.csv"
        new = not path.exists()
        f = path.open("a", newline="")
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
    w.writerow(row)
    f.flush()
    if writer is not None:
        for key, v in row.items():
            if key not in ("step", "epoch"):
                writer.add_scalar(f"step/{key}", v, step)
    return f, w


if __name__ == "__main__":
    try:
        main()
    except ConfigError as e:
        sys.exit(f"train_kd.py: error: {e}")
