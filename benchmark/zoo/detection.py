"""Faster R-CNN FPN detectors (torchvision) by name, for the detection protocols (`task: detection`).

`num_classes` is the number of FOREGROUND classes K (what a detection DataModule reports); the box
classifier has K + 1 outputs, index 0 being background (torchvision's convention). Backbones start from
random weights unless `pretrained_backbone=True` is passed explicitly (ImageNet weights, downloaded by
torchvision: online only; the tests never ask for them). A randomly initialised backbone trains with
ordinary BatchNorm; a pretrained one keeps torchvision's FrozenBatchNorm2d, as Detectron2 does.

Full-size detectors (the `coco` protocol, ND's Detectron2 pairs): `fasterrcnn_resnet101_fpn`,
`fasterrcnn_resnet50_fpn` (teachers), `fasterrcnn_resnet18_fpn`, `fasterrcnn_mobilenet_v3_large_fpn`
(students): 256-channel FPN, two-FC 1024-d box head, anchors 32–512.
Tiny detectors (the CPU `shapes` protocol, 64–128 px images): `_tiny` suffix — 64-channel FPN, 256-d box
head, anchors 8–128, 64 sampled RoIs per image and fewer RPN proposals (300/150 before/after NMS in
training); a MobileNetV3 backbone feeds the FPN from four resolutions (strides 4–32, the last block of each,
like a ResNet's layer1–4) instead of torchvision's two stride-32 taps, which leave a 64 px image a 2×2 map and
anchors of 32 px and more for 5–32 px objects (the `shapes` student stayed below 2 AP that way); the same
code path.

`set_input_size(model, size)` fixes the detector's resize to the protocol's image size (the transform holds
no weights, so a stored checkpoint loads whatever the size).
"""

from __future__ import annotations

from collections.abc import Callable

import torchvision
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import misc
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

FULL = {"fpn_channels": 256, "representation_size": 1024, "anchor_sizes": (32, 64, 128, 256, 512), "box_rois": 512}
TINY = {"fpn_channels": 64, "representation_size": 256, "anchor_sizes": (8, 16, 32, 64, 128), "box_rois": 64}
TINY.update(rpn_proposals=(300, 150, 150, 100), mobilenet_fpn_levels=4)
RESNETS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048}
MOBILENETS = ("mobilenet_v3_large", "mobilenet_v3_small")


def _weights(name: str, pretrained: bool):
    if not pretrained:
        return None
    return torchvision.models.get_model_weights(name).DEFAULT


def _resnet_body(name: str, pretrained: bool, trainable_layers: int, fpn_channels: int) -> BackboneWithFPN:
    norm = misc.FrozenBatchNorm2d if pretrained else nn.BatchNorm2d
    body = getattr(torchvision.models, name)(weights=_weights(name, pretrained), norm_layer=norm)
    layers = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        layers.append("bn1")
    for pname, p in body.named_parameters():
        if all(not pname.startswith(layer) for layer in layers):
            p.requires_grad_(False)
    last = RESNETS[name]
    in_channels = [last // 8, last // 4, last // 2, last]
    return_layers = {f"layer{i}": str(i - 1) for i in range(1, 5)}
    return BackboneWithFPN(body, return_layers, in_channels, fpn_channels, extra_blocks=LastLevelMaxPool())


def _mobilenet_body(
    name: str, pretrained: bool, trainable_layers: int, fpn_channels: int, fpn_levels: int
) -> BackboneWithFPN:
    norm = misc.FrozenBatchNorm2d if pretrained else nn.BatchNorm2d
    features = getattr(torchvision.models, name)(weights=_weights(name, pretrained), norm_layer=norm).features
    # strided blocks (torchvision marks them `_is_cn`)
    stages = [0] + [i for i, b in enumerate(features) if getattr(b, "_is_cn", False)] + [len(features) - 1]
    freeze_before = len(features) if trainable_layers == 0 else stages[max(len(stages) - trainable_layers, 0)]
    for block in features[:freeze_before]:
        block.requires_grad_(False)
    if fpn_levels == 2:  # torchvision's choice: the last two stage indices (both at stride 32)
        taps = [stages[-2], stages[-1]]
    else:  # the last block of each of the last `fpn_levels` resolutions (strides 4–32 for 4), like ResNet's layer1–4
        ends = [i - 1 for i in stages[2:-1]] + [len(features) - 1]
        taps = ends[-fpn_levels:]
    return_layers = {str(k): str(v) for v, k in enumerate(taps)}
    in_channels = [features[k].out_channels for k in taps]
    return BackboneWithFPN(features, return_layers, in_channels, fpn_channels, extra_blocks=LastLevelMaxPool())


def faster_rcnn(
    backbone: str,
    *,
    num_classes: int,
    fpn_channels: int,
    representation_size: int,
    anchor_sizes: tuple[int, ...],
    box_rois: int,
    rpn_proposals: tuple[int, int, int, int] = (2000, 2000, 1000, 1000),
    in_chans: int = 3,
    pretrained_backbone: bool = False,
    trainable_layers: int | None = None,
    image_size: int = 800,
    mobilenet_fpn_levels: int = 2,
) -> FasterRCNN:
    """A Faster R-CNN FPN with K = `num_classes` foreground classes (+ background). `rpn_proposals`: RPN
    proposals kept (pre-NMS train, post-NMS train, pre-NMS test, post-NMS test), torchvision's defaults."""
    if in_chans != 3:
        raise ValueError(f"the detectors take RGB images (in_chans 3), got in_chans={in_chans}")
    if num_classes < 1:
        raise ValueError(f"num_classes (foreground classes) must be ≥ 1, got {num_classes}")
    if backbone in RESNETS:
        trainable = 5 if trainable_layers is None else trainable_layers
        body = _resnet_body(backbone, pretrained_backbone, trainable, fpn_channels)
    elif backbone in MOBILENETS:
        trainable = 6 if trainable_layers is None else trainable_layers
        body = _mobilenet_body(backbone, pretrained_backbone, trainable, fpn_channels, mobilenet_fpn_levels)
    else:
        raise ValueError(f"unknown detector backbone {backbone!r}; valid: {', '.join([*RESNETS, *MOBILENETS])}")
    levels = len(body.fpn.inner_blocks) + 1  # + LastLevelMaxPool
    sizes = tuple((s,) for s in anchor_sizes[-levels:])
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * levels)
    head = TwoMLPHead(fpn_channels * 7 * 7, representation_size)
    model = FasterRCNN(
        body,
        num_classes=None,
        rpn_anchor_generator=anchors,
        box_head=head,
        box_predictor=FastRCNNPredictor(representation_size, num_classes + 1),
        box_batch_size_per_image=box_rois,
        rpn_pre_nms_top_n_train=rpn_proposals[0],
        rpn_post_nms_top_n_train=rpn_proposals[1],
        rpn_pre_nms_top_n_test=rpn_proposals[2],
        rpn_post_nms_top_n_test=rpn_proposals[3],
    )
    model.num_classes = num_classes  # foreground classes (the classifier has num_classes + 1 outputs)
    model.representation_size = representation_size
    model.backbone_name = backbone
    set_input_size(model, image_size)
    return model


def set_input_size(model: FasterRCNN, size: int) -> FasterRCNN:
    """Resize every image so that its shorter side is `size` (longer side at most `size`·1333/800)."""
    model.transform.min_size = (int(size),)
    model.transform.max_size = round(size * 1333 / 800)
    return model


def is_detector(model) -> bool:
    return isinstance(model, FasterRCNN)


def register_all(register: Callable) -> None:
    for backbone in (*RESNETS, *MOBILENETS):
        register(f"fasterrcnn_{backbone}_fpn", lambda b=backbone, **kw: faster_rcnn(b, **{**FULL, **kw}))
        register(f"fasterrcnn_{backbone}_fpn_tiny", lambda b=backbone, **kw: faster_rcnn(b, **{**TINY, **kw}))
