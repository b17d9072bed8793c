"""EfficientDet-D1 on COCO, google/automl's architecture and recipe.

Command:   python main.py --config=configs/efficientdet_d1.py --workdir=runs/efficientdet_d1
Profile:   python -m scaledet_jax.tools.profile --config=configs/efficientdet_d1.py
Published: 40.2 AP (COCO val, 300 epochs); 6.6M params, 6.13B multiply-adds (automl).
"""

from scaledet_jax import defaults


def get_config():
    return defaults.efficientdet_config("d1")
