"""RetinaNet ResNet-50-FPN on COCO: TF Model Garden's ``retinanet_resnetfpn_coco``.

Command:   python main.py --config=configs/retinanet_resnet50_fpn.py --workdir=runs/retinanet_r50
Network:   ResNet-50 (BN 0.99/1e-3), FPN P3-P7 (P6/P7 by stride-2 convs, BN on every output), RetinaNet
           head (4 x 3x3 conv 256 + BN per level), 9 anchors of size 4 * 2**level, relu, 91 classes.
Recipe:    640 input, batch 256, SGD 0.9, lr 0.32 after 500 warmup steps from 0.0067, x0.1 at epochs 57 and 67
           of 72, weight decay 1e-4, scale jitter 0.8-1.2 (Model Garden starts the backbone from ImageNet).
Params:    34,091,159 trainable, equal to the tf-models-official build (tests/test_faster_rcnn.py).
"""

import ml_collections

from scaledet_jax import defaults


def get_config():
    config = defaults.get_config()
    m = config.model
    m.activation = "relu"
    m.image_size = 640
    m.backbone = ml_collections.ConfigDict(
        dict(name="resnet", depth=50, stride_in_1x1=False, norm="batch", frozen_stages=0, bn_epsilon=None)
    )
    m.decoder = ml_collections.ConfigDict(dict(name="fpn", num_filters=256, extra_levels="conv", norm="batch"))
    m.anchor.anchor_size = 4.0
    config.loss.l2_weight_decay = 1e-4
    d = config.data
    d.aug_scale_min, d.aug_scale_max = 0.8, 1.2
    o = config.optim
    o.decay_epochs = (57, 67)
    o.warmup_steps = 500
    config.num_epochs = 72
    return config
