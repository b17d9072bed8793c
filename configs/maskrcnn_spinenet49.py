"""Mask R-CNN SpineNet-49 on COCO: TF Model Garden's ``maskrcnn_spinenet_coco`` network and recipe.

Command:   python main.py --config=configs/maskrcnn_spinenet49.py --workdir=runs/maskrcnn_spinenet49 \
               --config.data.coco_folder=/data/coco
           (the COCO download as a COCO folder: train2017/, val2017/, annotations/instances_*.json)
Published: 42.8 box AP / 37.8 mask AP (350 epochs); 40.8M parameters (Model Garden's build: 40,753,521).

Network: SpineNet-49 endpoints P3-P7 (256 channels, relu, no FPN), RPN with one shared 3x3 conv and
batch norm per level, 3 anchors of base size 3 * 2**level (w/h 0.5, 1, 2, centred at half the stride),
RoIAlign 7x7 / 14x14 on P3-P7, box head of 4 convs + 1 FC (1024) with batch norm, mask head of 4 convs +
deconv with batch norm, 91 classes. Recipe: 640 px, scale jitter 0.5-2.0, flips, batch 256, SGD 0.9,
lr 0.32 after a 2000-step warmup from 0.0067, x0.1 at epochs 320 and 340 of 350, L2 4e-5, Model
Garden's loss normalisations (``loss.style='model_garden'``), 1000 proposals in training and test.
RoIAlign is Model Garden's multilevel crop_and_resize (``roi.style='model_garden'``). Backbone, RPN, box
and mask heads equal Model Garden's on the same weights and RoIs (tests/test_parity_model_garden_maskrcnn.py).
"""

import ml_collections

from scaledet_jax import defaults


def get_config():
    config = defaults.maskrcnn_config()
    quick = defaults.get_config()  # Model Garden's SpineNet settings
    m = config.model
    m.image_size = 640
    m.min_level, m.max_level = 3, 7
    m.activation = "relu"
    m.conv_padding = m.pool_padding = "same"
    m.norm = ml_collections.ConfigDict(dict(momentum=0.99, epsilon=1e-3))
    m.backbone = quick.model.backbone
    m.backbone.model_id = "49"
    m.backbone.stochastic_depth_rate = 0.0
    m.decoder = ml_collections.ConfigDict(dict(name="none"))
    m.anchor.update(
        num_scales=1, aspect_ratios=(0.5, 1.0, 2.0), anchor_size=3.0, center_offset=0.5, round_base=False,
        integer_stride=False,
    )  # fmt: skip
    m.rpn.update(norm="batch", pre_nms_top_k_train=2000, post_nms_top_k_train=1000, pre_nms_top_k=1000,
                 post_nms_top_k=1000, min_size=0.0)  # fmt: skip
    m.roi.update(min_level=3, max_level=7, output_size=7, style="model_garden")
    m.box_head.update(num_convs=4, conv_filters=256, num_fcs=1, fc_dims=1024, norm="batch")
    m.mask_head.update(norm="batch", num_samples=128)
    m.detection.update(pre_nms_top_k=5000, score_threshold=0.05, nms_iou_threshold=0.5, max_detections=100)

    config.loss.update(style="model_garden", rpn_smooth_l1_beta=1.0 / 9.0, roi_smooth_l1_beta=1.0, l2_weight_decay=4e-5)
    d = config.data
    d.source = "coco_folder"
    d.train_split, d.eval_split = "train2017", "val2017"
    d.train_batch_size = 256
    d.aug_scale_min, d.aug_scale_max = 0.5, 2.0
    d.mask_crop_size = 112
    o = config.optim
    o.frozen = ()
    o.base_learning_rate = 0.32
    o.decay_epochs = (320, 340)
    o.warmup_steps = 2000
    o.warmup_learning_rate = 0.0067
    config.num_epochs = 350
    config.checkpoint_every_steps = config.eval_every_steps = defaults.COCO_TRAIN_EXAMPLES // 256
    return config
