"""EfficientDet-D0 on COCO, google/automl's architecture and recipe.

Command:   python main.py --config=configs/efficientdet_d0.py --workdir=runs/efficientdet_d0
Profile:   python -m scaledet_jax.tools.profile --config=configs/efficientdet_d0.py
Published: 34.3 AP (COCO val, 300 epochs); 3.9M params, 2.55B multiply-adds (automl).
"""

from scaledet_jax import defaults


def get_config():
    return defaults.efficientdet_config("d0")
