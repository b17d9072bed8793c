"""Faster R-CNN DetNet-59 quickstart on PASCAL VOC-format data: a narrow DetNet-59 (the seed's structure:
ResNet-50 stem and stages 2-4, then two dilated stride-16 stages of 3 bottlenecks) with DetNet_pytorch's
FPN (P6/P5/P4 added at stride 16 without upsampling, bilinear align-corners top-down, 3x3 smoothing on
P3/P2 only), an RPN on P2-P6 (strides 4, 8, 16, 16, 16) and a 2-FC box head, learning the built-in
synthetic shapes written as a VOC folder (Annotations/*.xml, JPEGImages/, ImageSets/Main; some objects
difficult), scored with VOC mAP@0.5.

Command: python main.py --config=configs/fasterrcnn_detnet59_voc_quickstart.py \
    --workdir=runs/fasterrcnn_detnet59_voc_quickstart
Measured (README): 8 min 4 s on 2 CPU cores, VOC mAP@0.5 0.881 (issue target: >= 0.8 within 20 minutes);
without zero_init_residual 0.531.
"""

import ml_collections

from scaledet_jax import defaults


def get_config():
    config = defaults.fasterrcnn_quickstart_config()  # synthetic data, Adam recipe, small RPN/box head
    m = config.model
    m.activation = "relu"
    m.conv_padding = m.pool_padding = "symmetric"
    m.norm = ml_collections.ConfigDict(dict(momentum=0.9, epsilon=1e-5))
    m.backbone = ml_collections.ConfigDict(
        dict(
            name="detnet",
            norm="batch",  # the seed's FrozenBN needs ImageNet statistics; from scratch, batch norm trains
            frozen_stages=0,
            bn_epsilon=1e-5,
            stem_filters=32,
            stage_filters=(32, 64, 128, 128, 128),  # half the seed's 64, 128, 256, 256, 256
            zero_init_residual=True,  # last BN gamma of each bottleneck at 0: 0.881 mAP instead of 0.531
        )
    )
    m.min_level, m.max_level = 2, 6
    m.feature_strides = (4, 8, 16, 16, 16)
    m.decoder = ml_collections.ConfigDict(
        dict(name="fpn", num_filters=64, backbone_max_level=6, upsample="bilinear_align_corners",
             output_levels=(2, 3), top_down_input="output", extra_levels="maxpool", norm="")
    )  # fmt: skip
    m.anchor.update(num_scales=1, anchor_size=4.0)  # 16 px at P2 .. 256 px at P6 (the seed: 32 .. 512)
    m.roi.update(min_level=2, max_level=5, canonical_size=64.0, canonical_level=4)

    config.data.synthetic_format = "voc"
    config.eval_protocol = "voc"
    return config
