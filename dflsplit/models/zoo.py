"""The registered networks: mlp, cnn, lenet, resnet18, vgg."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..registry import key
from .base import PartitionedModel, cut_sequential, flat_size, register_model


@dataclass
class MLPKeys:
    """Keys of model `mlp`."""

    hidden: list[int] = key(doc="widths of the hidden layers", factory=lambda: [128], ge=1)
    partitions: int | None = key(None, "partitions for split learning (default 1)", ge=1)


@register_model("mlp", num_partitions=None, keys=MLPKeys)
def mlp(cfg, input_shape, num_classes):
    """Fully connected ReLU network with `cfg.hidden` widths; cut into `cfg.partitions` parts (default 1)."""
    width = 1
    for d in input_shape:
        width *= d
    blocks: list[nn.Module] = []
    for i, h in enumerate(cfg.hidden):
        head = [nn.Flatten()] if i == 0 else []
        blocks.append(nn.Sequential(*head, nn.Linear(width, h), nn.ReLU()))
        width = h
    head = [nn.Flatten()] if not cfg.hidden else []
    blocks.append(nn.Sequential(*head, nn.Linear(width, num_classes)))
    parts = cfg.partitions or 1
    if parts > len(blocks):
        raise ValueError(
            f"model 'mlp' with hidden={cfg.hidden} has {len(blocks)} layers; "
            f"model.partitions={parts} is more than that"
        )
    return PartitionedModel(*cut_sequential(blocks, parts))


@register_model("cnn", num_partitions=4)
def cnn(cfg, input_shape, num_classes):
    """Small CNN, 4 partitions: conv block, conv block, flatten+linear+ReLU, linear.

    Works for 8×8 (digits), 28×28 (MNIST) and 32×32 (CIFAR-10) inputs.
    """
    c = input_shape[0]
    block1 = nn.Sequential(nn.Conv2d(c, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
    block2 = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
    features = flat_size(nn.Sequential(block1, block2), input_shape)
    block3 = nn.Sequential(nn.Flatten(), nn.Linear(features, 128), nn.ReLU())
    return PartitionedModel(block1, block2, block3, nn.Linear(128, num_classes))


@register_model("lenet", num_partitions=4)
def lenet(cfg, input_shape, num_classes):
    """decentralizepy's LeNet for CIFAR-10 (three 5×5 'same' convolutions with GroupNorm).

    4 partitions: one per convolution block, then flatten+linear.
    """
    c = input_shape[0]

    def block(cin, cout):
        return nn.Sequential(
            nn.Conv2d(cin, cout, 5, padding="same"), nn.GroupNorm(2, cout), nn.ReLU(), nn.MaxPool2d(2)
        )

    convs = [block(c, 32), block(32, 32), block(32, 64)]
    features = flat_size(nn.Sequential(*convs), input_shape)
    return PartitionedModel(*convs, nn.Sequential(nn.Flatten(), nn.Linear(features, num_classes)))


@register_model("resnet18", num_partitions=10)
def resnet18(cfg, input_shape, num_classes):
    """torchvision's ResNet-18 adapted to 32×32 inputs (3×3 stem, no max-pool).

    10 partitions: stem, the eight basic blocks, average-pool+flatten+linear.
    """
    from torchvision.models import resnet18 as tv_resnet18  # slow import: only when used

    net = tv_resnet18(num_classes=num_classes)
    net.conv1 = nn.Conv2d(input_shape[0], 64, 3, stride=1, padding=1, bias=False)
    stem = nn.Sequential(net.conv1, net.bn1, net.relu)
    blocks = [b for layer in (net.layer1, net.layer2, net.layer3, net.layer4) for b in layer]
    head = nn.Sequential(net.avgpool, nn.Flatten(), net.fc)
    return PartitionedModel(stem, *blocks, head)


@dataclass
class VGGKeys:
    """Keys of model `vgg`."""

    width: int = key(16, "channels of the first block; the second has 4x, the third 8x", ge=1)


@register_model("vgg", num_partitions=4, keys=VGGKeys)
def vgg(cfg, input_shape, num_classes):
    """Small VGG-style CNN (3x3 convolutions, ReLU, 2x2 max-pooling), 4 partitions: a first
    block of two convolutions of width w at full resolution, a second of two of 4w, a third
    of one of 8w ending in global average pooling, and the classifier (linear). For images
    whose sides are multiples of 8 (CIFAR-10's 32×32, digits' 8×8)."""
    c, w = input_shape[0], cfg.width

    def conv(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU()]

    block1 = nn.Sequential(*conv(c, w), *conv(w, w), nn.MaxPool2d(2))
    block2 = nn.Sequential(*conv(w, 4 * w), *conv(4 * w, 4 * w), nn.MaxPool2d(2))
    block3 = nn.Sequential(*conv(4 * w, 8 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return PartitionedModel(block1, block2, block3, nn.Linear(8 * w, num_classes))
