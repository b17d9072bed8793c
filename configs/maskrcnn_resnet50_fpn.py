"""Mask R-CNN ResNet-50-FPN on COCO: torchvision's ``maskrcnn_resnet50_fpn`` network and recipe.

Command:   python main.py --config=configs/maskrcnn_resnet50_fpn.py --workdir=runs/maskrcnn_r50 \
               --config.data.source=coco_folder --config.data.coco_folder=/data/coco \
               --config.data.train_split=train2017 --config.data.eval_split=val2017
           (the COCO download is a COCO folder: train2017/, val2017/, annotations/instances_*.json;
           tfds coco/2017 has no instance masks)
Convert:   python -m scaledet_jax.convert --from=torchvision --input=maskrcnn_resnet50_fpn_coco.pth \
               --config=configs/maskrcnn_resnet50_fpn.py --output=converted/maskrcnn_r50
Published: 37.9 box AP / 34.6 mask AP (torchvision, 26 epochs); 44,401,393 parameters (FrozenBN).
"""

from scaledet_jax import defaults


def get_config():
    config = defaults.maskrcnn_config()
    config.data.source = "coco_folder"
    config.data.train_split, config.data.eval_split = "train2017", "val2017"
    return config
