"""EfficientDet-D2 on COCO, google/automl's architecture and recipe.

Command:   python main.py --config=configs/efficientdet_d2.py --workdir=runs/efficientdet_d2
Profile:   python -m scaledet_jax.tools.profile --config=configs/efficientdet_d2.py
Published: 43.5 AP (COCO val, 300 epochs); 8.1M params, 11.0B multiply-adds (automl).
"""

from scaledet_jax import defaults


def get_config():
    return defaults.efficientdet_config("d2")
