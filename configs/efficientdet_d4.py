"""EfficientDet-D4 on COCO, google/automl's architecture and recipe.

Command:   python main.py --config=configs/efficientdet_d4.py --workdir=runs/efficientdet_d4
Profile:   python -m scaledet_jax.tools.profile --config=configs/efficientdet_d4.py
Published: 49.3 AP (COCO val, 300 epochs); 20.7M params, 55.3B multiply-adds (automl).
"""

from scaledet_jax import defaults


def get_config():
    return defaults.efficientdet_config("d4")
