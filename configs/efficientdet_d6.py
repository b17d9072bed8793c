"""EfficientDet-D6 on COCO, google/automl's architecture and recipe.

Command:   python main.py --config=configs/efficientdet_d6.py --workdir=runs/efficientdet_d6
Profile:   python -m scaledet_jax.tools.profile --config=configs/efficientdet_d6.py
Published: 52.1 AP (COCO val, 300 epochs); 51.9M params, 226.0B multiply-adds (automl).
"""

from scaledet_jax import defaults


def get_config():
    return defaults.efficientdet_config("d6")
