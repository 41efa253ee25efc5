"""The classifier networks: torchvision backbones and the seed-000 small CNN, cut in two.

Every model is ``features`` (image -> the activation heatmaps are taken from) then ``head``
(activation -> logits). When the head is global average pooling, optional dropout and one Linear
(ResNet, MobileNetV2, DenseNet, EfficientNetV2, the small CNN), ``cam_linear`` is that Linear and
Grad-CAM reduces to CAM computed from the forward pass's own features (``engine/heatmaps.py``).
VGG16's head has three Linear layers, and ``efficientnet_v2_s_selu`` (seed 002's head:
``Sequential(Dropout, SELU, Linear(1280, 1))``) has a nonlinearity after the pooling: their heatmaps
need the gradient.

No weights are ever downloaded. ImageNet initialisation reads torchvision's file from a path or
from torch's local cache, or fails with a message that says where to put it.

torchvision is imported when a backbone is first built, not with this module: its ``ops`` import
``torch._dynamo``, 1.6 s on 2 cores, and a version served from its kept ONNX graph
(``engine/serving.py``) never builds one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from meddaemon.engine.tasks import ARCHITECTURES

Init = Literal["scratch", "imagenet"]


class MissingPretrainedWeights(FileNotFoundError):
    """ImageNet weights were asked for but are neither given as a file nor in torch's cache."""


#: the state-dict key of a CAM head's Linear weight (``ClassifierNet.head`` is a :class:`GlobalPoolLinearHead`)
CAM_WEIGHT_KEY = "head.linear.weight"


class GlobalPoolLinearHead(nn.Module):
    def __init__(self, linear: nn.Linear, dropout: float = 0.0) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.linear = linear

    def forward(self, activation: Tensor) -> Tensor:
        return self.linear(self.dropout(torch.flatten(self.pool(activation), 1)))


class GlobalPoolSeluLinearHead(nn.Module):
    """Seed 002's EfficientNetV2-S classifier after the pooling: dropout, SELU, then one Linear.

    Not a CAM head (the SELU between pooling and Linear breaks CAM's equality with Grad-CAM)."""

    def __init__(self, linear: nn.Linear, dropout: float = 0.2) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.selu = nn.SELU()
        self.linear = linear

    def forward(self, activation: Tensor) -> Tensor:
        return self.linear(self.selu(self.dropout(torch.flatten(self.pool(activation), 1))))


class ClassifierNet(nn.Module):
    def __init__(self, architecture: str, features: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.architecture = architecture
        self.features = features
        self.head = head

    @property
    def cam_linear(self) -> nn.Linear | None:
        """The Linear of a global-pool + Linear head, or None when heatmaps need the gradient."""
        return self.head.linear if isinstance(self.head, GlobalPoolLinearHead) else None

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        activation = self.features(x)
        return activation, self.head(activation)


def small_cnn_features(in_channels: int, width: int = 32) -> nn.Sequential:
    """Seed 000's network for 100x100 ultrasound: four conv-BN-ReLU blocks, pooled between."""
    layers: list[nn.Module] = []
    channels = in_channels
    for i, out in enumerate((width, width * 2, width * 4, width * 8)):
        layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
        if i < 3:
            layers.append(nn.MaxPool2d(2))
        channels = out
    return nn.Sequential(*layers)


def build_model(
    architecture: str,
    in_channels: int,
    num_outputs: int,
    *,
    init: Init = "scratch",
    imagenet_weights: Path | None = None,
) -> ClassifierNet:
    """A network for ``in_channels`` (1: grey, as seed 001 adapts the first layer) and ``num_outputs`` logits."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; choose one of {', '.join(ARCHITECTURES)}")
    if architecture == "small_cnn":
        if init == "imagenet":
            raise ValueError("small_cnn has no ImageNet weights; use init='scratch'")
        return ClassifierNet(
            architecture, small_cnn_features(in_channels), GlobalPoolLinearHead(nn.Linear(256, num_outputs))
        )
    backbone = _torchvision_builder(architecture)(weights=None)
    if init == "imagenet":
        backbone.load_state_dict(_load_imagenet_state(architecture, imagenet_weights))
    features, head = _split(architecture, backbone, num_outputs)
    if in_channels != 3:
        _adapt_first_conv(features, in_channels)
    return ClassifierNet(architecture, features, head)


#: the torchvision builder and ImageNet weights enum of each backbone, by their names in ``torchvision.models``
_TORCHVISION = {
    "efficientnet_v2_s_selu": ("efficientnet_v2_s", "EfficientNet_V2_S_Weights"),
    "resnet18": ("resnet18", "ResNet18_Weights"),
    "resnet34": ("resnet34", "ResNet34_Weights"),
    "vgg16": ("vgg16", "VGG16_Weights"),
    "mobilenet_v2": ("mobilenet_v2", "MobileNet_V2_Weights"),
    "densenet121": ("densenet121", "DenseNet121_Weights"),
    "efficientnet_v2_s": ("efficientnet_v2_s", "EfficientNet_V2_S_Weights"),
}


def check_runs_at(model: nn.Module, architecture: str, channels: int, height: int, width: int) -> None:
    """``ValueError`` ("densenet121 cannot run at 16 x 16 pixels (...)") where ``model`` cannot take
    one image of that size: its pooling leaves nothing of a small one. Asked before a model is
    imported or trained at an image size of the user's, where PyTorch's error came after the file
    was converted (called damaged) or the dataset hashed (a traceback)."""
    from meddaemon.logs import error_line

    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, channels, height, width))
    except RuntimeError as exc:
        raise ValueError(f"{architecture} cannot run at {height} x {width} pixels ({error_line(exc)})") from None


def _torchvision_builder(architecture: str) -> Any:
    from torchvision import models

    return getattr(models, _TORCHVISION[architecture][0])


def _imagenet_url(architecture: str) -> str:
    from torchvision import models

    return str(getattr(models, _TORCHVISION[architecture][1]).IMAGENET1K_V1.url)


def imagenet_cache_path(architecture: str) -> Path:
    """Where torchvision would have cached the ImageNet file (``$TORCH_HOME/hub/checkpoints``)."""
    name = os.path.basename(_imagenet_url(architecture))
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def _load_imagenet_state(architecture: str, path: Path | None) -> dict[str, Tensor]:
    path = path or imagenet_cache_path(architecture)
    if not path.is_file():
        raise MissingPretrainedWeights(
            f"ImageNet weights for {architecture} are not on this machine and nothing is downloaded; "
            f"copy torchvision's {os.path.basename(_imagenet_url(architecture))} to {path} or pass its path, "
            "or train from scratch"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    # torchvision's own checkpoint format; weights_only refuses anything but tensors (no code is unpickled)
    return torch.load(path, map_location="cpu", weights_only=True)


def _split(architecture: str, net: nn.Module, num_outputs: int) -> tuple[nn.Module, nn.Module]:
    if architecture in ("resnet18", "resnet34"):
        features = nn.Sequential(
            net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4
        )
        return features, GlobalPoolLinearHead(nn.Linear(net.fc.in_features, num_outputs))
    if architecture == "mobilenet_v2":
        return net.features, GlobalPoolLinearHead(nn.Linear(net.last_channel, num_outputs), dropout=0.2)
    if architecture == "efficientnet_v2_s":
        linear = net.classifier[-1]
        return net.features, GlobalPoolLinearHead(nn.Linear(linear.in_features, num_outputs), dropout=0.2)
    if architecture == "efficientnet_v2_s_selu":
        linear = net.classifier[-1]
        return net.features, GlobalPoolSeluLinearHead(nn.Linear(linear.in_features, num_outputs), dropout=0.2)
    if architecture == "densenet121":
        # torchvision applies F.relu(inplace=True) after features[-1]; an explicit, non-in-place ReLU
        # keeps the activation heatmaps are taken from intact.
        features = nn.Sequential(net.features, nn.ReLU(inplace=False))
        return features, GlobalPoolLinearHead(nn.Linear(net.classifier.in_features, num_outputs))
    if architecture == "vgg16":
        classifier = net.classifier
        classifier[-1] = nn.Linear(classifier[-1].in_features, num_outputs)
        return net.features, nn.Sequential(net.avgpool, nn.Flatten(1), classifier)
    raise ValueError(architecture)


def _adapt_first_conv(features: nn.Module, in_channels: int) -> None:
    """Replace the first convolution for ``in_channels``; pretrained RGB filters are summed for grey."""
    parent, name, conv = _first_conv(features)
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        conv.bias is not None,
    )
    with torch.no_grad():
        if in_channels == 1:
            new.weight.copy_(conv.weight.sum(dim=1, keepdim=True))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    setattr(parent, name, new)


def _first_conv(module: nn.Module) -> tuple[nn.Module, str, nn.Conv2d]:
    """The convolution the image meets first (depth-first order is forward order for these networks)."""
    for qualified, child in module.named_modules():
        if isinstance(child, nn.Conv2d):
            parent_name, _, name = qualified.rpartition(".")
            return module.get_submodule(parent_name), name, child
    raise ValueError("no convolution found")
