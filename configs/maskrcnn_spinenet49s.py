"""Mask R-CNN SpineNet-49S at 640: the seed's (yan-roo/SpineNet-Pytorch, mmdetection v1.1)
``mask_rcnn_spinenet_49S_B_8gpu_640`` network and recipe.

Command:   python main.py --config=configs/maskrcnn_spinenet49s.py --workdir=runs/maskrcnn_spinenet49s \
               --config.data.coco_folder=/data/coco
Published: 39.7 box AP / 34.9 mask AP, 13.92M parameters, 63.77B FLOPs (seed); paper 39.3 / 34.8, 13.9M, 60.2B.

Network as the seed builds it: SpineNet-49S endpoints P3-P7 (128 channels), no FPN, RPN of one 3x3
conv (128, no norm) with 3 anchors of base size 3 * 2**level, RoIAlign 7x7 / 14x14 (2x2 samples) on
P3-P6 with mmdetection v1's level rule and RoIAlign (P3 below 112 px; ``roi.style='mmdet'``), box
head of 4 convs (128, no bias, batch norm) + 1 FC (512, no norm), mask head of 4 convs (128, no
bias, batch norm) + deconv (no norm). With the seed's 81 classes (mmdetection's contiguous labels)
the network has 13,916,084 parameters (13.92M); this training config keeps the COCO category ids
(91 outputs). Recipe: batch 128 (16 x 8 GPUs), SGD 0.9, lr 0.14, 4000-step linear warmup from 0.1x,
x0.1 at epochs 320 and 340 of 350, weight decay 4e-5, scale jitter 0.5-2.0, flips, sync batch norm
(momentum 0.99, eps 1e-3).
Convert:   python -m scaledet_jax.convert --from=mmdet-spinenet --config=configs/maskrcnn_spinenet49s.py \
               --input=mask_rcnn_spinenet_49S.pth --output=converted/maskrcnn_spinenet49s
The converter sets the seed's backbone semantics (symmetric padding, ...), its 81 classes and COCO
ids, and its mmdetection-v1 test path: "+1" anchors ((stride - 1) / 2 centres, rounding), proposals and
boxes, NMS on rescaled boxes, get_seg_masks pasting and the keep-ratio OpenCV test-time resize, so that
``Detector.predict`` gives mmdetection's detections and masks (tests/test_convert_mmdet_maskrcnn.py).
"""

from scaledet_jax import defaults


def get_config():
    config = defaults.maskrcnn_spinenet_config("49S")  # Model Garden's network, then the seed's differences
    m = config.model
    m.rpn.update(num_filters=128, norm="", post_nms_top_k_train=2000)
    # mmdetection v1's RoI levels (P3 below 112 px: finest scale 56) and RoIAlign (end + 1, no minimum size).
    m.roi.update(max_level=6, sampling_ratio=2, style="mmdet", canonical_size=56.0)
    m.box_head.update(conv_filters=128, conv_bias=False, fc_dims=512, fc_norm=False)
    m.mask_head.update(conv_filters=128, conv_bias=False, deconv_norm=False, sampling_ratio=2, num_samples=0)
    config.loss.style = "torchvision"
    config.data.train_batch_size = 128
    o = config.optim
    o.base_learning_rate = 0.14 * 256 / 128  # lr 0.14 at batch 128
    o.warmup_steps = 4000
    o.warmup_learning_rate = 0.014
    config.checkpoint_every_steps = config.eval_every_steps = defaults.COCO_TRAIN_EXAMPLES // 128
    return config
