"""Faster R-CNN ResNet-50-FPN on COCO: torchvision's ``fasterrcnn_resnet50_fpn`` network and recipe.

Command:   python main.py --config=configs/fasterrcnn_resnet50_fpn.py --workdir=runs/fasterrcnn_r50
Convert:   python -m scaledet_jax.convert --from=torchvision --input=fasterrcnn_resnet50_fpn_coco.pth \
               --config=configs/fasterrcnn_resnet50_fpn.py --output=converted/fasterrcnn_r50
Published: 37.0 box AP (torchvision, 26 epochs); 41,755,286 parameters (FrozenBN).
"""

from scaledet_jax import defaults


def get_config():
    return defaults.fasterrcnn_config()
