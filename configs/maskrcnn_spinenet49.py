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

from scaledet_jax import defaults


def get_config():
    return defaults.maskrcnn_spinenet_config("49")
