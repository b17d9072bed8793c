"""The shared base config; every file in configs/ is a small override of ``get_config()``.

Defaults are TF Model Garden's ``retinanet_spinenet_coco`` recipe (SpineNet-49, 640 input,
batch 256, SGD 0.9, lr 0.32 stepped x0.1 at epochs 475/490 of 500, warmup 2000 steps,
scale jitter 0.1-2.0, weight decay 4e-5, sync BN, swish, stochastic depth 0.2).
"""

from __future__ import annotations

import ml_collections

COCO_TRAIN_EXAMPLES = 118287
COCO_VAL_EXAMPLES = 5000


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    # ---- model -------------------------------------------------------------------------------
    model = config.model = ml_collections.ConfigDict()
    model.name = "retinanet"
    model.num_classes = 91  # COCO category ids 1..90 plus background slot 0, as Model Garden
    model.background_slot = True  # output 0 unused (Model Garden); False: output c is category c + 1 (automl)
    # With background_slot False: output c is category category_ids[c] (mmdetection's 80 contiguous
    # COCO classes); empty = category c + 1.
    model.category_ids = ()
    model.image_size = 640  # square input; must be a multiple of 2**max_level
    model.min_level = 3
    model.max_level = 7
    model.activation = "swish"
    model.dtype = "float32"  # compute dtype; 'bfloat16' keeps float32 parameters
    # Input normalisation the weights were trained with: (pixel - mean) / std on 0-255 pixels, in
    # 'rgb' or 'bgr' channel order (mean/std in that order). ImageNet RGB for every source so far.
    model.input = ml_collections.ConfigDict(
        dict(mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375), channels="rgb")
    )
    model.conv_padding = "same"  # TF 'SAME'; 'symmetric' for PyTorch-trained weights
    model.pool_padding = "same"
    model.norm = ml_collections.ConfigDict(dict(momentum=0.99, epsilon=1e-3))
    model.backbone = ml_collections.ConfigDict(
        dict(
            name="spinenet",
            model_id="49",
            stochastic_depth_rate=0.2,
            endpoint_activation=True,
            resample_pooling="repeated",  # 'single': mmdetection port (one 5x5/4 pool from level 4 to 7)
        )
    )
    model.head = ml_collections.ConfigDict(dict(num_convs=4, num_filters=256, conv_bias=True))
    model.anchor = ml_collections.ConfigDict(dict(num_scales=3, aspect_ratios=(0.5, 1.0, 2.0), anchor_size=3.0))
    model.detection = ml_collections.ConfigDict(
        dict(pre_nms_top_k=5000, score_threshold=0.05, nms_iou_threshold=0.5, max_detections=100)
    )
    # How Detector.predict / scaledet_jax.predict resize an image: 'letterbox' as training and evaluation do, or
    # a converted checkpoint's source ('mmdet', 'torchvision', 'effdet'; recorded by the converter; see
    # data/test_resize.py). min_size / max_size 0: image_size.
    model.test_resize = ml_collections.ConfigDict(
        dict(style="letterbox", min_size=0, max_size=0, size_divisor=0, pad_square=False)
    )

    # ---- losses ------------------------------------------------------------------------------
    config.loss = ml_collections.ConfigDict(
        dict(
            focal_alpha=0.25,
            focal_gamma=1.5,
            huber_delta=0.1,
            box_loss_weight=50.0,
            l2_weight_decay=4e-5,
            match_threshold=0.5,
            unmatched_threshold=0.5,
        )
    )

    # ---- data --------------------------------------------------------------------------------
    data = config.data = ml_collections.ConfigDict()
    data.source = "tfds"  # 'tfds' (coco/2017, voc/2007, voc/2012), 'coco_folder', 'voc_folder' or 'synthetic'
    data.tfds_name = "coco/2017"
    data.tfds_data_dir = ""  # '' = the tfds default (~/tensorflow_datasets)
    data.coco_folder = ""  # <split>/ + annotations/instances_<split>.json, for data.source='coco_folder'
    # For data.source='voc_folder': a VOCdevkit year folder (Annotations/, JPEGImages/, ImageSets/Main/<split>.txt),
    # or several comma-separated ('VOCdevkit/VOC2007,VOCdevkit/VOC2012': a split is the union of its files).
    data.voc_folder = ""
    # VOC class numbering: '' = the 20 VOC classes (ids 1-20) when every object name is one, else the names
    # found, sorted (ids 1..N); 'voc' = always the 20; 'a,b,c' = these names as ids 1..N.
    data.voc_classes = ""
    data.synthetic_train_images = 600  # data.source='synthetic' writes a COCO folder (workdir/synthetic_data)
    data.synthetic_val_images = 100
    data.synthetic_seed = 0
    # Shapes drawn, as classes 1..N: '' = circle,square,triangle; also pentagon, hexagon, star, cross.
    data.synthetic_classes = ""
    data.synthetic_format = "coco"  # 'voc': a VOC folder instead (workdir/synthetic_voc), some objects difficult
    # Where a COCO folder's prepared tfds copy goes ('' = FOLDER/tfds, or WORKDIR/prepared_data when the
    # folder is read-only); each copy is keyed by a fingerprint of the jsons and image files.
    data.cache_dir = ""
    data.skip_bad_images = False  # True: leave unreadable images of a COCO folder out (counted in the log)
    data.shuffle_buffer = 1000
    data.train_split = "train"
    data.eval_split = "validation"
    data.train_batch_size = 256
    data.eval_batch_size = 8
    data.max_instances = 100
    # Mask models (pipeline.needs_masks): each instance mask is carried cropped to its final box and resized
    # to mask_crop_size x mask_crop_size (Model Garden's Mask R-CNN parser), not at full image size.
    data.mask_crop_size = 112
    data.aug_rand_hflip = True
    data.aug_scale_min = 0.1
    data.aug_scale_max = 2.0

    # ---- optimisation ------------------------------------------------------------------------
    optim = config.optim = ml_collections.ConfigDict()
    optim.optimizer = "sgd"
    optim.momentum = 0.9
    optim.base_learning_rate = 0.32  # at batch 256; scaled linearly with train_batch_size
    optim.schedule = "stepwise"  # 'stepwise' or 'cosine'
    optim.decay_epochs = (475, 490)
    optim.decay_factor = 0.1
    optim.warmup_steps = 2000
    optim.warmup_learning_rate = 0.0067
    optim.gradient_clip_norm = 0.0  # 0 = off
    optim.ema_decay = 0.0  # 0 = off; e.g. 0.9998 for EfficientDet
    # Regular expressions over parameter paths ('backbone/stem_conv/kernel'): matching parameters are
    # not updated and not weight-decayed (e.g. torchvision's frozen stem + first stage).
    optim.frozen = ()
    # Regular expressions over batch-norm paths ('backbone/stem_bn'): matching batch norms normalise with their
    # running statistics in training too and never update them (mmdetection's norm_eval), for fine-tuning with
    # small batches; add the same patterns to optim.frozen to hold their scale and offset as well.
    optim.frozen_batch_stats = ()

    # ---- schedule of the run -----------------------------------------------------------------
    config.num_epochs = 500
    config.total_steps = 0  # > 0 overrides num_epochs
    config.stop_after_steps = 0  # > 0: leave after this many steps (time-boxed jobs); rerun to resume
    config.seed = 0
    config.init_from = ""  # a converted checkpoint (python -m scaledet_jax.convert) to start from
    # A directory for JAX's persistent compilation cache ('' = off): a later launch of the same config
    # (resume, evaluate, a second seed) loads the compiled train/predict steps instead of recompiling them.
    config.compilation_cache_dir = ""
    config.log_every_steps = 100
    config.checkpoint_every_steps = 462  # one COCO epoch at batch 256
    config.keep_checkpoints = 3
    config.eval_every_steps = 462
    config.eval_pictures = 4  # eval images drawn to TensorBoard (ground truth | predictions) at each evaluation
    # 'coco': pycocotools (AP, AP50, ...); 'voc': PASCAL VOC mAP at IoU eval_voc.iou_threshold, all-point ('mAP',
    # VOC2010+) and 11-point ('mAP_voc07'), difficult objects (and crowd) ignored.
    config.eval_protocol = "coco"
    # The VOC devkit's conventions: boxes are inclusive pixel indices (width = x2 - x1 + pixel_offset; 0 for
    # continuous boxes such as a COCO folder's), a detection matches at IoU >= iou_threshold (MATLAB VOCevaldet;
    # strict_iou=True: IoU > iou_threshold, as py-faster-rcnn's and detectron2's voc_eval.py).
    config.eval_voc = ml_collections.ConfigDict(dict(iou_threshold=0.5, pixel_offset=1.0, strict_iou=False))
    return config


def use_synthetic_data(config: ml_collections.ConfigDict, batch_size: int = 16) -> None:
    """The built-in synthetic shapes (600 train / 100 held-out images, 1-6 objects each) with mild
    scale jitter, as the quickstart recipes train on them."""
    d = config.data
    d.source = "synthetic"
    d.train_split, d.eval_split = "train", "val"
    d.train_batch_size = d.eval_batch_size = batch_size
    d.max_instances = 8
    d.aug_scale_min, d.aug_scale_max = 0.8, 1.25


# automl's EfficientDet table: (input size, BiFPN width, BiFPN repeats, head repeats, backbone,
# BiFPN fusion, anchor scale, max level).
EFFICIENTDET_VARIANTS = {
    "d0": (512, 64, 3, 3, "b0", "fastattn", 4.0, 7),
    "d1": (640, 88, 4, 3, "b1", "fastattn", 4.0, 7),
    "d2": (768, 112, 5, 3, "b2", "fastattn", 4.0, 7),
    "d3": (896, 160, 6, 4, "b3", "fastattn", 4.0, 7),
    "d4": (1024, 224, 7, 4, "b4", "fastattn", 4.0, 7),
    "d5": (1280, 288, 7, 4, "b5", "fastattn", 4.0, 7),
    "d6": (1280, 384, 8, 5, "b6", "sum", 4.0, 7),
    "d7": (1536, 384, 8, 5, "b6", "sum", 5.0, 7),
    "d7x": (1536, 384, 8, 5, "b7", "sum", 4.0, 8),
}


def efficientdet_config(variant: str) -> ml_collections.ConfigDict:
    """automl's EfficientDet-``variant`` on COCO (90 classes, no background slot) and its recipe:
    SGD 0.9, lr 0.08 at batch 64 after a 1-epoch warmup from 0.008, cosine over 300 epochs,
    EMA 0.9998 (used for evaluation), weight decay 4e-5, gradient clipping 10, scale jitter 0.1-2.0.
    """
    size, width, repeats, head_repeats, backbone, fusion, anchor_scale, max_level = EFFICIENTDET_VARIANTS[variant]
    config = get_config()
    m = config.model
    m.name = "efficientdet"
    m.num_classes = 90
    m.background_slot = False
    m.image_size = size
    m.min_level, m.max_level = 3, max_level
    m.backbone = ml_collections.ConfigDict(
        # bn_epsilon None = model.norm.epsilon; effdet's PyTorch-trained backbones use 1e-5
        dict(name="efficientnet", model_id=backbone, drop_connect_rate=0.2, bn_epsilon=None)
    )
    m.decoder = ml_collections.ConfigDict(
        dict(name="bifpn", num_filters=width, num_repeats=repeats, weight_method=fusion, conv_bias=True)
    )
    m.head = ml_collections.ConfigDict(dict(num_convs=head_repeats, num_filters=width, conv_bias=True))
    m.anchor = ml_collections.ConfigDict(dict(num_scales=3, aspect_ratios=(1.0, 2.0, 0.5), anchor_size=anchor_scale))

    config.data.train_batch_size = 64
    o = config.optim
    o.base_learning_rate = 0.08 * 256 / 64  # lr 0.08 at batch 64; scaled linearly with the batch
    o.schedule = "cosine"
    o.warmup_steps = COCO_TRAIN_EXAMPLES // 64  # one epoch
    o.warmup_learning_rate = 0.008
    o.gradient_clip_norm = 10.0
    o.ema_decay = 0.9998
    config.num_epochs = 300
    config.checkpoint_every_steps = COCO_TRAIN_EXAMPLES // 64
    config.eval_every_steps = COCO_TRAIN_EXAMPLES // 64 * 10
    return config


def fasterrcnn_config() -> ml_collections.ConfigDict:
    """torchvision's ``fasterrcnn_resnet50_fpn`` and its COCO recipe, on our square-padded inputs.

    Network: ResNet-50 (FrozenBN eps 1e-5, stem + first stage frozen, symmetric padding), FPN P2-P5 +
    max-pooled P6, RPN (1 conv, 3 anchors per location of size 32 * 2**(level - 2), rounded and
    centred at multiples of the stride), RoIAlign 7x7 (sampling 2, not aligned) on P2-P5, two
    1024-d FC layers, 91 classes (COCO ids, 0 = background), box coding weights (10, 10, 5, 5).
    Recipe (torchvision references/detection): SGD 0.9, lr 0.02 at batch 16 after a 1000-step
    linear warmup from 0.001x, x0.1 at epochs 16 and 22 of 26, weight decay 1e-4, horizontal flips.
    torchvision resizes the shorter side to 800 (longer <= 1333); here images are resized so the
    longer side is 1024 and padded square, as Model Garden's Mask R-CNN recipe does.
    """
    config = get_config()
    m = config.model
    m.name = "faster_rcnn"
    m.num_classes = 91
    m.background_slot = True
    m.image_size = 1024
    m.min_level, m.max_level = 2, 6
    m.activation = "relu"
    m.conv_padding = m.pool_padding = "symmetric"
    m.norm = ml_collections.ConfigDict(dict(momentum=0.9, epsilon=1e-5))
    m.backbone = ml_collections.ConfigDict(
        dict(name="resnet", depth=50, stride_in_1x1=False, norm="frozen", frozen_stages=2, bn_epsilon=1e-5)
    )
    m.decoder = ml_collections.ConfigDict(dict(name="fpn", num_filters=256, extra_levels="maxpool", norm=""))
    m.anchor = ml_collections.ConfigDict(
        dict(
            num_scales=1,
            aspect_ratios=(2.0, 1.0, 0.5),
            anchor_size=8.0,
            center_offset=0.0,
            round_base=True,
            integer_stride=True,
        )
    )
    m.rpn = ml_collections.ConfigDict(
        dict(
            num_convs=1,
            num_filters=256,
            norm="",
            pre_nms_top_k_train=2000,
            post_nms_top_k_train=2000,
            pre_nms_top_k=1000,
            post_nms_top_k=1000,
            nms_iou=0.7,
            min_size=1e-3,
            score_threshold=0.0,
            positive_iou=0.7,
            negative_iou=0.3,
            batch_size_per_image=256,
            positive_fraction=0.5,
        )
    )
    m.roi = ml_collections.ConfigDict(
        dict(
            min_level=2,
            max_level=5,
            output_size=7,
            sampling_ratio=2,
            aligned=False,
            canonical_size=224.0,
            canonical_level=4,
            num_samples=512,
            foreground_fraction=0.25,
            foreground_iou=0.5,
            background_iou_high=0.5,
            background_iou_low=0.0,
        )
    )
    m.box_head = ml_collections.ConfigDict(
        dict(num_convs=0, conv_filters=256, num_fcs=2, fc_dims=1024, norm="", class_agnostic_boxes=False)
    )
    m.box_coder_weights = (10.0, 10.0, 5.0, 5.0)
    m.detection = ml_collections.ConfigDict(
        dict(pre_nms_top_k=5000, score_threshold=0.05, nms_iou_threshold=0.5, max_detections=100, min_size=1e-2)
    )
    config.loss = ml_collections.ConfigDict(
        dict(
            style="torchvision",  # or 'model_garden' (Huber losses; the betas are its deltas, 1.0 for the RoI box)
            rpn_smooth_l1_beta=1.0 / 9.0,
            roi_smooth_l1_beta=1.0 / 9.0,
            rpn_score_weight=1.0,
            rpn_box_weight=1.0,
            class_weight=1.0,
            box_weight=1.0,
            l2_weight_decay=1e-4,
        )
    )
    d = config.data
    d.train_batch_size = 16
    d.aug_scale_min = d.aug_scale_max = 1.0
    o = config.optim
    o.optimizer = "sgd"
    o.base_learning_rate = 0.02 * 256 / 16  # lr 0.02 at batch 16; scaled linearly with the batch
    o.schedule = "stepwise"
    o.decay_epochs = (16, 22)
    o.warmup_steps = 1000
    o.warmup_learning_rate = 0.02 * 0.001
    o.frozen = ("^backbone/(stem_|stage2_)",)  # torchvision trains layers 2-4 only (trainable_backbone_layers=3)
    config.num_epochs = 26
    config.checkpoint_every_steps = COCO_TRAIN_EXAMPLES // 16
    config.eval_every_steps = COCO_TRAIN_EXAMPLES // 16 * 2
    return config


def fasterrcnn_quickstart_config() -> ml_collections.ConfigDict:
    """The Faster R-CNN quickstart (configs/fasterrcnn_quickstart.py): SpineNet-49S x0.35 endpoints P3-P5
    feeding an RPN and a 2-FC box head directly, 128x128 synthetic shapes, Adam 4e-3 cosine, 666 steps."""
    config = fasterrcnn_config()
    quick = get_config()  # the RetinaNet quickstart's backbone settings
    m = config.model
    m.num_classes = 4  # background + circle, square, triangle
    m.image_size = 128
    m.min_level, m.max_level = 3, 5
    m.activation = "swish"
    m.conv_padding = m.pool_padding = "same"
    m.norm = quick.model.norm
    m.backbone = quick.model.backbone
    m.backbone.model_id = "49S"
    m.backbone.filter_size_scale = 0.35
    m.backbone.endpoints_num_filters = 64
    m.backbone.stochastic_depth_rate = 0.0
    m.decoder = ml_collections.ConfigDict(dict(name="none"))
    m.anchor.update(
        num_scales=2,
        aspect_ratios=(2.0, 1.0, 0.5),
        anchor_size=3.0,
        center_offset=0.5,
        round_base=False,
        integer_stride=False,
    )
    m.rpn.update(num_filters=64, pre_nms_top_k_train=600, post_nms_top_k_train=256, pre_nms_top_k=300,
                 post_nms_top_k=100)  # fmt: skip
    m.roi.update(min_level=3, max_level=5, canonical_size=64.0, num_samples=64, foreground_fraction=0.25)
    m.box_head.update(num_fcs=2, fc_dims=256)
    m.detection.pre_nms_top_k = 1000

    use_synthetic_data(config)
    config.loss.l2_weight_decay = 4e-5
    o = config.optim
    o.frozen = ()
    o.optimizer = "adam"
    o.base_learning_rate = 4e-3 * 256 / 16  # lr 4e-3 at batch 16
    o.schedule = "cosine"
    o.warmup_steps = 50
    o.warmup_learning_rate = 2e-4
    o.gradient_clip_norm = 10.0

    config.num_epochs = 18  # 666 steps
    config.log_every_steps = 20
    config.checkpoint_every_steps = 200
    config.eval_every_steps = 0
    return config


def maskrcnn_config() -> ml_collections.ConfigDict:
    """torchvision's ``maskrcnn_resnet50_fpn``: ``fasterrcnn_config()`` plus its mask branch (RoIAlign
    14x14 sampling 2 on P2-P5, four 3x3 convs of 256, a 2x2 stride-2 transposed conv, a 1x1 conv to
    91 28x28 mask logits; no normalisation) and mask loss weight 1; same 26-epoch recipe.
    """
    config = fasterrcnn_config()
    config.model.name = "mask_rcnn"
    config.model.mask_head = ml_collections.ConfigDict(
        # num_samples 0: every foreground RoI of the sampled num_samples * foreground_fraction slots
        dict(num_convs=4, conv_filters=256, norm="", class_agnostic=False, roi_output_size=14, sampling_ratio=2,
             num_samples=0)
    )  # fmt: skip
    config.loss.mask_weight = 1.0
    config.data.mask_crop_size = 112  # ground-truth masks carried cropped to their boxes (Model Garden's parser)
    return config


def maskrcnn_spinenet_config(model_id: str = "49") -> ml_collections.ConfigDict:
    """TF Model Garden's ``maskrcnn_spinenet_coco`` network and recipe for SpineNet-``model_id``
    (configs/maskrcnn_spinenet49.py describes it)."""
    config = maskrcnn_config()
    quick = get_config()  # Model Garden's SpineNet settings
    m = config.model
    m.image_size = 640
    m.min_level, m.max_level = 3, 7
    m.activation = "relu"
    m.conv_padding = m.pool_padding = "same"
    m.norm = ml_collections.ConfigDict(dict(momentum=0.99, epsilon=1e-3))
    m.backbone = quick.model.backbone
    m.backbone.model_id = model_id
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
    config.checkpoint_every_steps = config.eval_every_steps = COCO_TRAIN_EXAMPLES // 256
    return config


# maskrcnn-benchmark's SOLVER for the VoVNet seed's 2x recipe: 180k iterations of 16 images, x0.1 at 120k / 160k.
VOVNET_RCNN_ITERATIONS, VOVNET_RCNN_STEPS = 180_000, (120_000, 160_000)


def vovnet_rcnn_config(depth: int = 39, masks: bool = False) -> ml_collections.ConfigDict:
    """The VoVNet seed's (stigma0617/maskrcnn-benchmark-vovnet) ``e2e_{faster,mask}_rcnn_V_{depth}_FPN_2x``
    network and recipe, on our square-padded inputs.

    Network: VoVNet-``depth`` (FrozenBatchNorm without epsilon, identity on the OSA modules after a stage's first,
    ceil-mode stage pools, symmetric padding, nothing frozen: ``FREEZE_CONV_BODY_AT: 0``), FPN P2-P5 + max-pooled P6,
    RPN (1 conv, 3 anchors of size 32 * 2**(level - 2) centred at stride / 2), RoIAlign 7x7 (14x14 for masks) with 2x2
    samples, not aligned, Detectron's level rule (``roi.style='maskrcnn_benchmark'``), two 1024-d FCs, box weights
    (10, 10, 5, 5); BGR 0-255 input minus (102.9801, 115.9465, 122.7717), std 1. 91 outputs (COCO ids with a
    background slot); converting the seed's checkpoints sets its 81 (``--from=maskrcnn-benchmark``).
    Recipe: SGD 0.9, lr 0.02 at batch 16 after a 500-step linear warmup from 1/100 of it, x0.1 at iterations
    120k and 160k of 180k (24.3 COCO epochs), weight decay 1e-4 on weights (``WEIGHT_DECAY_BIAS: 0``; the seed's
    2x bias learning rate is not reproduced), RPN 2000 / 1000 proposals per level before NMS (train / test) and
    1000 after (the seed's 2000 per 2-image GPU batch in training), 512 RoIs at 25% foreground, RoI box loss
    smooth L1 beta 1. The seed resizes the shorter side to 800 (longer <= 1333) and pads to multiples of 32; here
    the longer side is resized to 1333 and padded square to 1344 (a multiple of 2**6).
    """
    config = maskrcnn_config() if masks else fasterrcnn_config()
    m = config.model
    m.image_size = 1344
    m.input = ml_collections.ConfigDict(dict(mean=(102.9801, 115.9465, 122.7717), std=(1.0, 1.0, 1.0), channels="bgr"))
    m.backbone = ml_collections.ConfigDict(
        dict(
            name="vovnet", depth=depth, norm="frozen", bn_epsilon=0.0, residual=True, frozen_stages=0,
            pool_padding="valid", pool_ceil_mode=True,
        )
    )  # fmt: skip
    m.anchor.update(center_offset=0.5, round_base=False, integer_stride=True)  # as --from=maskrcnn-benchmark sets
    m.rpn.update(pre_nms_top_k_train=2000, post_nms_top_k_train=1000, pre_nms_top_k=1000, post_nms_top_k=1000)
    m.rpn.min_size = 0.0  # Detectron's remove_small_boxes(min_size=0)
    m.roi.style = "maskrcnn_benchmark"
    m.detection.min_size = 0.0  # maskrcnn-benchmark's box PostProcessor removes no small boxes
    config.loss.roi_smooth_l1_beta = 1.0  # fastrcnn_loss: smooth_l1_loss(beta=1)
    config.loss.l2_weight_decay = 1e-4
    o = config.optim
    o.frozen = ()
    o.base_learning_rate = 0.02 * 256 / 16  # lr 0.02 at batch 16; scaled linearly with the batch
    o.warmup_steps = 500
    o.warmup_learning_rate = 0.02 / 100  # WARMUP_FACTOR 0.01
    o.decay_epochs = tuple(step * 16 / COCO_TRAIN_EXAMPLES for step in VOVNET_RCNN_STEPS)
    config.data.train_batch_size = 16
    config.total_steps = VOVNET_RCNN_ITERATIONS  # at batch 16 (24.3 epochs); scale it with another batch size
    config.num_epochs = 25  # unused while total_steps is set
    return config


def detnet_fasterrcnn_config() -> ml_collections.ConfigDict:
    """guoruoqian/DetNet_pytorch's DetNet-59 FPN Faster R-CNN and its PASCAL VOC 2007 recipe (README: 75.9 mAP).

    Network (what ``--from=detnet-pytorch`` also sets from a checkpoint): DetNet-59 (FrozenBN eps 1e-5, stem and
    stage 2 frozen: FIXED_BLOCKS 1), its FPN (P6 = 1x1 of C6; P5, P4 added at stride 16 without resizing; P3, P2
    by align-corners bilinear upsampling, 3x3 smoothing on P3 and P2 only), strides (4, 8, 16, 16, 16), RPN on
    P2-P6 (3x3 conv of 512, anchors 32..512 px with w/h 0.5, 1, 2 centred at multiples of the stride, not rounded),
    RoIAlignAvg 14 x 14 on P2-P5 (``roi.style='jwyang_avg'``), two 1024-d FC layers, 21 classes (VOC ids 1-20,
    0 = background), box coding weights (10, 10, 5, 5); ImageNet RGB normalisation.
    Recipe (``trainval_net.py --bs 2 --lr 1e-3 --epochs 12``, ``cfgs/detnet59.yml``): SGD 0.9, lr 1e-3 at batch 2,
    no warmup, weight decay 1e-4, x0.1 after 10 of 11 epochs (its loop runs epochs 1..11; README lr_decay 10).
    The seed's epoch is two passes over VOC07 trainval (USE_FLIPPED appends a flipped copy of every image), so
    here: 22 epochs, decay after 20 (random flips instead). 128 RoIs per image (TRAIN.BATCH_SIZE, background IoU
    [0, 0.5)), RoI box loss smooth L1 beta 1 (sigma 1), RPN beta 1/9 (sigma 3); test NMS 0.3, score threshold 0,
    100 detections. The seed resizes the shorter side to 600 (VOC's 500 x 375 -> 800 x 600); here the longer side
    fits the square input: 800 gives VOC's 4:3 images the seed's scale (a multiple of 16, the coarsest stride).
    Not reproduced: proposals ranked over all levels together (pre-NMS 12000 / 6000, post-NMS 2000 / 300; here
    pre-NMS per level), +1 box widths in decoding and clipping, unflipped-and-flipped copies per epoch.
    """
    config = fasterrcnn_config()
    m = config.model
    m.num_classes = 21
    m.background_slot = True
    m.category_ids = ()
    m.image_size = 800
    m.min_level, m.max_level = 2, 6
    m.feature_strides = (4, 8, 16, 16, 16)
    m.backbone = ml_collections.ConfigDict(
        dict(name="detnet", norm="frozen", frozen_stages=2, bn_epsilon=1e-5, stage_blocks=(3, 4, 6, 3, 3),
             stem_filters=64, stage_filters=(64, 128, 256, 256, 256))
    )  # fmt: skip
    m.decoder = ml_collections.ConfigDict(
        dict(name="fpn", num_filters=256, backbone_max_level=6, upsample="bilinear_align_corners",
             output_levels=(2, 3), top_down_input="output", extra_levels="maxpool", norm="", conv_bias=True)
    )  # fmt: skip
    m.anchor.update(
        num_scales=1, aspect_ratios=(0.5, 1.0, 2.0), anchor_size=8.0, center_offset=0.0, round_base=False,
        integer_stride=False,
    )  # fmt: skip
    m.rpn.update(num_filters=512, pre_nms_top_k_train=2000, post_nms_top_k_train=2000, pre_nms_top_k=1000,
                 post_nms_top_k=300, nms_iou=0.7, min_size=0.0)  # fmt: skip
    m.roi.update(output_size=14, style="jwyang_avg", num_samples=128, foreground_fraction=0.25, foreground_iou=0.5,
                 background_iou_high=0.5, background_iou_low=0.0)  # fmt: skip
    m.box_head.update(num_convs=0, num_fcs=2, fc_dims=1024, norm="", class_agnostic_boxes=False)
    m.detection.update(score_threshold=0.0, nms_iou_threshold=0.3, max_detections=100)
    config.loss.update(roi_smooth_l1_beta=1.0, rpn_smooth_l1_beta=1.0 / 9.0, l2_weight_decay=1e-4)
    config.data.train_batch_size = 2
    o = config.optim
    o.base_learning_rate = 1e-3 * 256 / 2  # lr 1e-3 at batch 2; scaled linearly with the batch
    o.schedule = "stepwise"
    o.decay_epochs = (20,)
    o.decay_factor = 0.1
    o.warmup_steps = 0
    o.frozen = ("^backbone/(stem_|stage2_)",)  # FIXED_BLOCKS 1: RCNN_layer0 and RCNN_layer1
    config.num_epochs = 22
    config.checkpoint_every_steps = config.eval_every_steps = 5011 // 2  # one pass over VOC07 trainval
    return config
