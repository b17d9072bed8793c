"""The source layouts the converter reads, and how to check each against its PyTorch original.

A layout names the tensors of one family of PyTorch checkpoints in our variable tree, the model
options its semantics need (padding, activation, BN epsilon, ...), the part of our model it fills
(``scope``: the whole detector, or only the backbone for ImageNet weights), and optionally a
reference: a function building the original PyTorch module so the converter can measure parity.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from scaledet_jax.convert import automl as automl_layout
from scaledet_jax.convert import detnet_pytorch as detnet_layout
from scaledet_jax.convert import effdet as effdet_layout
from scaledet_jax.convert import maskrcnn_benchmark as maskrcnn_benchmark_layout
from scaledet_jax.convert import mmdet as mmdet_layout
from scaledet_jax.convert import model_garden as model_garden_layout
from scaledet_jax.convert import torchvision as torchvision_layout


@dataclasses.dataclass(frozen=True)
class Layout:
    name: str
    description: str
    source: Callable[..., Callable]  # (state keys, target shapes) -> source_key(path)
    ignored: Callable[[str], str | None]
    scope: tuple[str, ...] = ()
    model_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    duplicates: Callable[[str], str | None] = lambda key: None
    reference: Callable[[str, Any, int], Any] | None = None  # (model name, our config, size) -> torch module
    compare: Callable[..., dict[str, float]] | None = None  # (torch module, flax model, variables, images)
    # Options read from the checkpoint itself (e.g. the number of classes): (state, config) -> options.
    options_from_state: Callable[[Any, Any], dict[str, Any]] = lambda state, config: {}
    # (config) -> (path, array) -> array: re-orders tensors whose channel order differs from ours.
    transform: Callable[[Any], Callable[[tuple, np.ndarray], np.ndarray]] | None = None
    # (state) -> state: tensors re-shaped or combined before mapping (DetNet_pytorch's RPN score fold, FC-as-conv).
    prepare: Callable[[Any], Any] | None = None
    # TF checkpoints (Model Garden, automl) instead of PyTorch files: read with tf.train.load_checkpoint, kernels
    # already in Flax's HWIO / [in, out] layout.
    tensorflow: bool = False
    shadow_suffix: str | None = None  # TF: read '<name><suffix>' (e.g. EMA shadows) in place of '<name>'
    # (state, target shapes, model, config, image size) -> source_key, for layouts whose keys follow the
    # model's structure (Model Garden's creation order); takes the place of ``source``.
    model_source: Callable[..., Callable] | None = None

    def check_input(self, path: str) -> None:
        from scaledet_jax.convert import checkpoint, tf_checkpoint

        (tf_checkpoint.check_input if self.tensorflow else checkpoint.check_input)(path)

    def size_mib(self, path: str) -> float:
        from scaledet_jax.convert import tf_checkpoint

        return tf_checkpoint.size_mib(path) if self.tensorflow else os.path.getsize(path) / 2**20

    def read(self, path: str):
        """(state, [(ignored entry, reason)]) of the checkpoint at ``path``."""
        from scaledet_jax.convert import checkpoint, tf_checkpoint

        if self.tensorflow:
            return tf_checkpoint.load(path, self.ignored, self.shadow_suffix)
        return checkpoint.load_state_dict(path)

    def options(self, state, config) -> dict[str, Any]:
        """Every model option the converted weights need: the layout's and the checkpoint's."""
        return {**self.model_options, **self.options_from_state(state, config)}

    def convert(self, state, config, image_size: int, progress=None):
        """Sets this layout's model options on ``config`` and maps ``state`` onto the model it then
        describes (strictly: ``torch_layout.ConversionError`` on any mismatch).

        Returns (model, abstract variables of the whole model, converted variables of ``scope``,
        report, the model options set).
        """
        from scaledet_jax.convert import checkpoint, torch_layout
        from scaledet_jax.models import build_model
        from scaledet_jax.tools import profile

        options = self.options(state, config)
        checkpoint.set_model_options(config, options)
        model = build_model(config.model)
        shapes = profile.abstract_variables(model, image_size)
        target = {collection: shapes[collection] for collection in shapes}
        for part in self.scope:
            target = {c: {part: t[part]} for c, t in target.items() if part in t}
        if self.prepare is not None:
            state = self.prepare(state)
        if self.model_source is not None:
            source = self.model_source(state, target, model, config, image_size)
        else:
            source = self.source(state.keys(), target)
        variables, report = torch_layout.convert(
            state,
            target,
            source,
            self.ignored,
            self.duplicates,
            progress=progress,
            transform=self.transform(config) if self.transform else None,
            to_flax=(lambda path, array: array) if self.tensorflow else torch_layout.flax_array,
        )
        return model, shapes, variables, report, options


# The input normalisation all these sources trained with: ImageNet mean/std on RGB 0-255 pixels
# (mmdetection's img_norm_cfg with to_rgb=True; timm/effdet IMAGENET_DEFAULT_MEAN/STD * 255).
IMAGENET_RGB_INPUT = {
    "input.mean": (123.675, 116.28, 103.53),
    "input.std": (58.395, 57.12, 57.375),
    "input.channels": "rgb",
}


def _effdet_reference(name: str, config, size: int):
    """effdet's ``name`` reshaped like our config (classes, levels, size), random init, no download."""
    import effdet

    m = config.model
    cfg = effdet.get_efficientdet_config(name)
    cfg.num_classes = m.num_classes
    cfg.min_level, cfg.max_level = m.min_level, m.max_level
    cfg.num_levels = m.max_level - m.min_level + 1
    cfg.image_size = (size, size)
    return effdet.EfficientDet(cfg, pretrained_backbone=False)


def _compare_detector(reference, model, variables, images: np.ndarray) -> dict[str, float]:
    import torch

    with torch.no_grad():
        class_ref, box_ref = reference.eval()(torch.from_numpy(images).permute(0, 3, 1, 2))
    outputs = model.apply(variables, images, train=False)
    levels = sorted(outputs["class_outputs"])
    worst = {"class": 0.0, "box": 0.0}
    for level, cls, box in zip(levels, class_ref, box_ref, strict=True):
        for kind, ours, theirs in (
            ("class", outputs["class_outputs"][level], cls),
            ("box", outputs["box_outputs"][level], box),
        ):
            diff = np.max(np.abs(np.asarray(ours) - theirs.permute(0, 2, 3, 1).numpy()))
            worst[kind] = max(worst[kind], float(diff))
    return worst


def _timm_reference(name: str, config, size: int):
    import timm

    return timm.create_model(name, pretrained=False, features_only=True)


def _compare_backbone(reference, model, variables, images: np.ndarray) -> dict[str, float]:
    import torch

    with torch.no_grad():
        features = reference.eval()(torch.from_numpy(images).permute(0, 3, 1, 2))
    ours = model.apply(variables, images, train=False, method=lambda m, x, train: m.backbone(x, train))
    worst = 0.0
    for info, theirs in zip(reference.feature_info.get_dicts(), features, strict=True):
        level = int(np.log2(info["reduction"]))
        if level in ours:
            worst = max(worst, float(np.max(np.abs(np.asarray(ours[level]) - theirs.permute(0, 2, 3, 1).numpy()))))
    return {"features": worst}


LAYOUTS = {
    layout.name: layout
    for layout in (
        Layout(
            name="effdet",
            description="rwightman effdet tf_efficientdet_* (TF semantics) and efficientdet_* (PyTorch semantics)",
            source=effdet_layout.effdet_source,
            ignored=effdet_layout.effdet_ignored,
            model_options=IMAGENET_RGB_INPUT,
            options_from_state=effdet_layout.effdet_options,
            reference=_effdet_reference,
            compare=_compare_detector,
        ),
        Layout(
            name="model-garden",
            description="TF Model Garden SpineNet RetinaNet / Mask R-CNN TF checkpoints (retinanet_spinenet_coco, "
            "maskrcnn_spinenet_coco: prefix or directory)",
            source=lambda keys, shapes: None,
            ignored=model_garden_layout.model_garden_ignored,
            options_from_state=model_garden_layout.model_garden_options,
            prepare=model_garden_layout.model_garden_prepare,
            tensorflow=True,
            model_source=model_garden_layout.model_garden_source,
        ),
        Layout(
            name="automl",
            description="google/automl EfficientDet D0-D7 TF checkpoints (efficientdet-dN/ as released; EMA "
            "shadows used when present)",
            source=automl_layout.automl_source,
            ignored=automl_layout.automl_ignored,
            options_from_state=automl_layout.automl_options,
            prepare=automl_layout.automl_prepare,
            tensorflow=True,
            shadow_suffix=automl_layout.EMA_SUFFIX,
        ),
        Layout(
            name="mmdet-spinenet",
            description="mmdetection v1.1 SpineNet RetinaNet / Mask R-CNN (yan-roo / lucifer443 SpineNet-Pytorch)",
            source=mmdet_layout.spinenet_source,
            ignored=mmdet_layout.spinenet_ignored,
            model_options={**mmdet_layout.SPINENET_OPTIONS, **IMAGENET_RGB_INPUT},
            duplicates=mmdet_layout.head_duplicates,
            options_from_state=mmdet_layout.spinenet_options,
            transform=mmdet_layout.predictor_transform,
        ),
        Layout(
            name="mmdet-efficientdet",
            description="mmdetection v1.1 EfficientDet D0-D5 (lucifer443 EfficientDet-Pytorch)",
            source=mmdet_layout.efficientdet_source,
            ignored=mmdet_layout.spinenet_ignored,
            model_options={**mmdet_layout.EFFICIENTDET_OPTIONS, **IMAGENET_RGB_INPUT},
            duplicates=mmdet_layout.head_duplicates,
            options_from_state=mmdet_layout.retinanet_class_options,
            transform=mmdet_layout.efficientdet_transform,
        ),
        Layout(
            name="torchvision",
            description="torchvision fasterrcnn / maskrcnn / retinanet_resnet50_fpn (FrozenBatchNorm eps 1e-5)",
            source=torchvision_layout.torchvision_source,
            ignored=torchvision_layout.torchvision_ignored,
            model_options={"backbone.bn_epsilon": 1e-5, **IMAGENET_RGB_INPUT},
            options_from_state=torchvision_layout.torchvision_options,
            transform=torchvision_layout.torchvision_transform,
            reference=torchvision_layout.torchvision_reference,
            compare=torchvision_layout.torchvision_compare,
        ),
        Layout(
            # torchvision's published COCO_V1 weights (fasterrcnn_resnet50_fpn_coco-258fb6c6.pth,
            # retinanet_resnet50_fpn_coco-eeacb38b.pth): torchvision runs them with FrozenBatchNorm
            # eps 0 (overwrite_eps): the epsilon FrozenBatchNorm2d had before torchvision 0.8
            # (pytorch/vision#2933), when they were trained.
            name="torchvision-coco-v1",
            description="torchvision's published COCO_V1 Faster/Mask R-CNN / RetinaNet weights (FrozenBatchNorm eps 0)",
            source=torchvision_layout.torchvision_source,
            ignored=torchvision_layout.torchvision_ignored,
            model_options={"backbone.bn_epsilon": 0.0, **IMAGENET_RGB_INPUT},
            options_from_state=torchvision_layout.torchvision_options,
            transform=torchvision_layout.torchvision_transform,
            reference=torchvision_layout.torchvision_reference,
            compare=torchvision_layout.torchvision_compare,
        ),
        Layout(
            name="maskrcnn-benchmark",
            description="maskrcnn-benchmark (and its VoVNet fork) Faster / Mask R-CNN ResNet-FPN (MSRA) or VoVNet-FPN",
            source=maskrcnn_benchmark_layout.source,
            ignored=maskrcnn_benchmark_layout.ignored,
            options_from_state=maskrcnn_benchmark_layout.options,
            transform=maskrcnn_benchmark_layout.transform,
        ),
        Layout(
            name="timm-vovnet",
            description="timm vovnet39a / vovnet57a ImageNet weights as the backbone initialisation",
            source=maskrcnn_benchmark_layout.timm_vovnet_source,
            ignored=maskrcnn_benchmark_layout.timm_vovnet_ignored,
            scope=("backbone",),
            model_options=IMAGENET_RGB_INPUT,
            options_from_state=maskrcnn_benchmark_layout.timm_vovnet_options,
            reference=maskrcnn_benchmark_layout.timm_vovnet_reference,
            compare=maskrcnn_benchmark_layout.timm_vovnet_compare,
        ),
        Layout(
            name="detnet-pytorch",
            description="guoruoqian/DetNet_pytorch DetNet-59 FPN Faster R-CNN (fpn_*.pth, POOLING_MODE 'align')",
            source=detnet_layout.detector_source,
            ignored=detnet_layout.ignored,
            model_options=IMAGENET_RGB_INPUT,
            options_from_state=detnet_layout.detector_options,
            transform=detnet_layout.transform,
            prepare=detnet_layout.prepare,
        ),
        Layout(
            name="detnet-pytorch-imagenet",
            description="guoruoqian/DetNet_pytorch ImageNet DetNet-59 (detnet59.pth) as the backbone initialisation",
            source=detnet_layout.imagenet_source,
            ignored=detnet_layout.imagenet_ignored,
            scope=("backbone",),
            model_options=IMAGENET_RGB_INPUT,
            options_from_state=detnet_layout.imagenet_options,
        ),
        Layout(
            name="timm-efficientnet",
            description="timm tf_efficientnet_b* ImageNet weights as the backbone initialisation",
            source=lambda keys, shapes: effdet_layout.timm_efficientnet_source(keys, shapes, scope=("backbone",)),
            ignored=effdet_layout.timm_efficientnet_ignored,
            scope=("backbone",),
            model_options=IMAGENET_RGB_INPUT,
            reference=_timm_reference,
            compare=_compare_backbone,
        ),
    )
}
