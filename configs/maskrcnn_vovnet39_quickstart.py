"""Mask R-CNN VoVNet-39 quickstart: a narrow VoVNet-39 (the seed's structure: stem, 1-1-2-2 OSA modules
of 5 layers, identity on later modules, ceil-mode stage pools) at 1/4 width with batch norm, an FPN
P2-P6 (maskrcnn-benchmark's: 1x1 laterals, nearest top-down, 3x3 outputs, max-pooled P6), RPN, box
and mask heads, learning the built-in synthetic shapes at 128x128.

Command: python main.py --config=configs/maskrcnn_vovnet39_quickstart.py \
    --workdir=runs/maskrcnn_vovnet39_quickstart
Generates the dataset, trains and evaluates bbox and segm AP on the held-out split; README has the
measured time and APs (issue target: box AP >= 0.45, mask AP >= 0.4 within 20 minutes on 2 CPU cores).
"""

import ml_collections

from scaledet_jax import defaults


def get_config():
    config = defaults.fasterrcnn_quickstart_config()  # synthetic data, Adam recipe, small RPN/box head
    m = config.model
    m.name = "mask_rcnn"
    m.activation = "relu"
    m.conv_padding = "symmetric"
    m.norm = ml_collections.ConfigDict(dict(momentum=0.9, epsilon=1e-5))
    m.backbone = ml_collections.ConfigDict(
        dict(
            name="vovnet",
            depth=39,
            norm="batch",  # the seed's FrozenBN needs ImageNet statistics; from scratch, batch norm trains
            bn_epsilon=1e-5,
            residual=True,
            stem_channels=(16, 16, 32),
            stage_channels=(32, 40, 48, 56),
            concat_channels=(64, 128, 192, 256),
        )
    )
    m.min_level, m.max_level = 2, 6
    m.decoder = ml_collections.ConfigDict(dict(name="fpn", num_filters=64, extra_levels="maxpool", norm=""))
    m.anchor.update(num_scales=1, anchor_size=4.0)  # 16 px at P2 .. 256 px at P6
    m.roi.update(min_level=2, max_level=5, canonical_size=64.0, canonical_level=4)
    m.mask_head = ml_collections.ConfigDict(
        dict(num_convs=4, conv_filters=64, norm="", class_agnostic=False, roi_output_size=14, sampling_ratio=2,
             num_samples=0)
    )  # fmt: skip
    config.loss.mask_weight = 1.0
    config.data.mask_crop_size = 56
    return config
