"""Architectures of the KD recipes, with the state-dict names of the code that published them.

* ImageNet: torchvision's ResNets; MobileNetV1 as in mdistiller
  (mdistiller/models/imagenet/mobilenetv1.py) - "MobileNet" in the KD tables is V1.
* CIFAR-100: ResNet8x4/ResNet32x4 and WRN-16-2/WRN-40-2 as in CRD (Tian et al., ICLR 2020,
  github.com/HobbitLong/RepDistiller models/resnet.py, models/wrn.py), which mdistiller reuses;
  same module names, so their released teacher checkpoints load (the fixed ``AvgPool2d(8)`` /
  ``AvgPool2d(7)`` are ``AdaptiveAvgPool2d(1)`` here: the same on 32x32 / 224x224 inputs, no
  parameters, and any input size works).
* DeiT / RegNetY-160 (DTO-KD's pair), and any other model name timm knows (``regnety_002``
  stands in for RegNetY-160 in the tests), come from timm 1.0 with random weights
  (``timm.create_model(name, pretrained=False, ...)``); ViTs are built for the run's image size.
* ``cnn<W>``: a small CNN of width W for the digits recipe and the tests; ``cnn<W>gn`` the same
  with GroupNorm (per-sample, so exact under data parallelism).

``build_model(name, num_classes, in_channels)``; ``MODELS`` lists the names; ``feature_stage``
gives the module name of a model's last stage for feature distillation (``FeatureCapture``):
``FEATURES[name]`` for the registered models, timm's ``feature_info`` for the others.
"""

from __future__ import annotations

import difflib
import re

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FEATURES", "MODELS", "build_model", "feature_stage", "is_timm"]


# ----------------------------------------------------------------------------- CIFAR ResNets
class _CifarBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample=None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + residual)


class CifarResNet(nn.Module):
    """CRD's CIFAR ResNet (depth = 6n + 2, basic blocks)."""

    def __init__(self, depth: int, num_filters: list[int], num_classes: int = 100, in_channels=3):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"depth must be 6n + 2, got {depth}")
        n = (depth - 2) // 6
        self.inplanes = num_filters[0]
        self.conv1 = nn.Conv2d(in_channels, num_filters[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(num_filters[1], n)
        self.layer2 = self._make_layer(num_filters[2], n, stride=2)
        self.layer3 = self._make_layer(num_filters[3], n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(num_filters[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )
        layers = [_CifarBasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [_CifarBasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# ----------------------------------------------------------------------------- WRN
class _WrnBlock(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = (
            None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride, bias=False)
        )

    def forward(self, x):
        if self.equal_in_out:
            out = self.relu1(self.bn1(x))
            shortcut = x
        else:
            x = self.relu1(self.bn1(x))
            out = x
            shortcut = self.convShortcut(x)
        out = self.conv2(self.relu2(self.bn2(self.conv1(out))))
        return shortcut + out


class _WrnStage(nn.Module):
    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *[
                _WrnBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
                for i in range(n)
            ]
        )

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    """CRD's WRN-d-k (depth = 6n + 4, pre-activation blocks, no dropout)."""

    def __init__(self, depth: int, widen: int, num_classes: int = 100, in_channels: int = 3):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        ch = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, ch[0], 3, 1, 1, bias=False)
        self.block1 = _WrnStage(n, ch[0], ch[1], 1)
        self.block2 = _WrnStage(n, ch[1], ch[2], 2)
        self.block3 = _WrnStage(n, ch[2], ch[3], 2)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(ch[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()
            elif isinstance(m, nn.Linear):
                m.bias.data.zero_()

    def forward(self, x):
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = self.relu(self.bn1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# ----------------------------------------------------------------------------- MobileNetV1
def _conv_bn(inp: int, oup: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, 3, stride, 1, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True)
    )


def _conv_dw(inp: int, oup: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False),
        nn.BatchNorm2d(inp),
        nn.ReLU(inplace=True),
        nn.Conv2d(inp, oup, 1, 1, 0, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU(inplace=True),
    )


class MobileNetV1(nn.Module):
    """MobileNetV1 (Howard et al. 2017) in mdistiller's layout (``model.*``, ``fc``)."""

    def __init__(self, num_classes: int = 1000, in_channels: int = 3) -> None:
        super().__init__()
        cfg = [(32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1),
               (256, 512, 2)] + [(512, 512, 1)] * 5 + [(512, 1024, 2), (1024, 1024, 1)]  # fmt: skip
        self.model = nn.Sequential(
            _conv_bn(in_channels, 32, 2),
            *[_conv_dw(i, o, s) for i, o, s in cfg],
            nn.AdaptiveAvgPool2d(1),
        )
        self.fc = nn.Linear(1024, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.model(x), 1))


# ----------------------------------------------------------------------------- small CNN
class SmallCNN(nn.Module):
    """conv-conv-pool-conv-pool-linear of width ``w`` (the quickstart's CNN, any input size).

    ``norm="gn"`` (``cnn<W>gn``) swaps BatchNorm for GroupNorm(1, C), a per-sample
    normalisation: split over processes, a batch then gives exactly the one-process result
    (BatchNorm normalises over each process's shard, as in any DDP run without SyncBatchNorm).
    """

    def __init__(
        self, width: int, num_classes: int = 10, in_channels: int = 1, norm: str = "bn"
    ) -> None:
        super().__init__()
        w = width

        def nrm(c: int) -> nn.Module:
            return nn.BatchNorm2d(c) if norm == "bn" else nn.GroupNorm(1, c)

        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1), nrm(w), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1), nrm(2 * w), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nrm(2 * w), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )  # fmt: skip
        self.fc = nn.Linear(2 * w, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.features(x), 1))


# ----------------------------------------------------------------------------- registry
def _torchvision(name: str):
    def build(num_classes: int, in_channels: int) -> nn.Module:
        import torchvision

        if in_channels != 3:
            raise ValueError(f"{name} takes RGB images (3 channels), the data has {in_channels}")
        return getattr(torchvision.models, name)(weights=None, num_classes=num_classes)

    return build


def _import_timm(name: str):
    try:
        import timm
    except ImportError:
        raise ValueError(
            f"model {name!r} comes from timm, which is not installed: pip install timm "
            "(or pip install 'gradbal[examples]')"
        ) from None
    return timm


def timm_kwargs(name: str, image_size: int | None) -> dict:
    """``img_size`` for the timm models whose shapes depend on it (ViTs: the position
    embedding has one entry per patch), so DeiT runs at any ``--image-size`` (32x32 in the
    tests). CNNs such as RegNet take any size and do not accept the argument."""
    timm = _import_timm(name)
    cfg = timm.models.get_pretrained_cfg(name)
    if image_size is None or cfg is None or not cfg.fixed_input_size:
        return {}
    return {"img_size": image_size}


def _timm(name: str):
    def build(
        num_classes: int, in_channels: int, drop_path: float = 0.0, image_size: int | None = None
    ) -> nn.Module:
        timm = _import_timm(name)
        # pretrained=False: building a model never downloads (--teacher-pretrained asks for it)
        return timm.create_model(
            name, pretrained=False, num_classes=num_classes, in_chans=in_channels,
            drop_path_rate=drop_path, **timm_kwargs(name, image_size),
        )  # fmt: skip

    build.timm = True
    return build


def _timm_names() -> list[str]:
    try:
        import timm
    except ImportError:
        return []
    return timm.list_models()


def _timm_knows(name: str) -> bool:
    try:
        import timm
    except ImportError:
        return False
    return timm.is_model(name)


_BUILDERS = {
    "resnet18": _torchvision("resnet18"),
    "resnet34": _torchvision("resnet34"),
    "resnet50": _torchvision("resnet50"),
    "mobilenetv1": lambda nc, ic: MobileNetV1(nc, ic),
    "resnet8x4": lambda nc, ic: CifarResNet(8, [32, 64, 128, 256], nc, ic),
    "resnet32x4": lambda nc, ic: CifarResNet(32, [32, 64, 128, 256], nc, ic),
    "wrn_16_2": lambda nc, ic: WideResNet(16, 2, nc, ic),
    "wrn_40_2": lambda nc, ic: WideResNet(40, 2, nc, ic),
    "regnety_160": _timm("regnety_160"),
    "deit_tiny_patch16_224": _timm("deit_tiny_patch16_224"),
    "deit_small_patch16_224": _timm("deit_small_patch16_224"),
}
MODELS = sorted(_BUILDERS) + [
    "cnn<W> (e.g. cnn4, cnn32)",
    "cnn<W>gn (GroupNorm)",
    "any other timm model name",
]

#: Last-stage module names for feature distillation (``--features``).
FEATURES = {
    "resnet18": "layer4",
    "resnet34": "layer4",
    "resnet50": "layer4",
    "mobilenetv1": "model.13",
    "resnet8x4": "layer3",
    "resnet32x4": "layer3",
    "wrn_16_2": "block3",
    "wrn_40_2": "block3",
    "regnety_160": "s4",
    "deit_tiny_patch16_224": "blocks.11",
    "deit_small_patch16_224": "blocks.11",
    "cnn": "features.6",
}


_CNN = re.compile(r"cnn(\d+)(gn)?")


def _builder(name: str):
    """The registered builder, a timm builder for any other name timm knows, or None."""
    if name in _BUILDERS:
        return _BUILDERS[name]
    if _CNN.fullmatch(name) is None and _timm_knows(name):
        return _timm(name)
    return None


def is_timm(name: str) -> bool:
    return getattr(_builder(name), "timm", False)


def build_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    drop_path: float = 0.0,
    image_size: int | None = None,
) -> nn.Module:
    """A model with random weights (never downloads).

    ``name``: a registered name (``MODELS``), ``cnn<W>[gn]``, or any timm model name (e.g.
    ``regnety_002``, a small stand-in for RegNetY-160 in the tests). ``drop_path``
    (stochastic depth) applies to the timm models only; ``image_size`` reaches the timm
    models that need it (ViTs, see :func:`timm_kwargs`) and is ignored by the others.
    """
    m = _CNN.fullmatch(name)
    build = None if m else _builder(name)
    if m is None and build is None:
        close = difflib.get_close_matches(name, [*_BUILDERS, *_timm_names()], n=3, cutoff=0.8)
        hint = f"; did you mean {close}?" if close else ""
        raise ValueError(f"unknown model {name!r}{hint}; choose from {MODELS}")
    timm_model = getattr(build, "timm", False)
    if drop_path and not timm_model:
        raise ValueError(f"drop path (stochastic depth) applies to timm models, not {name!r}")
    if m:
        return SmallCNN(int(m.group(1)), num_classes, in_channels, m.group(2) or "bn")
    if timm_model:
        return build(num_classes, in_channels, drop_path, image_size)
    return build(num_classes, in_channels)


def feature_stage(name: str, model: nn.Module | None = None) -> str:
    """The module whose output is distilled (``--features``): the last stage.

    Registered models name it in ``FEATURES``; any other timm model reports its stages in
    ``feature_info`` (``s4`` for RegNets, ``blocks.<depth-1>`` for ViTs), read off ``model``.
    """
    key = "cnn" if _CNN.fullmatch(name) else name
    if key in FEATURES:
        return FEATURES[key]
    info = getattr(model, "feature_info", None)
    if info:
        return info[-1]["module"]
    raise ValueError(
        f"no feature stage known for {name!r}: add its last stage's module name to "
        "FEATURES in examples/classification/models.py, or run with --features false"
    )
