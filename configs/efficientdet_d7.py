"""EfficientDet-D7 on COCO, google/automl's architecture and recipe.

Command:   python main.py --config=configs/efficientdet_d7.py --workdir=runs/efficientdet_d7
Profile:   python -m scaledet_jax.tools.profile --config=configs/efficientdet_d7.py
Published: 53.4 AP (COCO val, 300 epochs); 51.9M params, 325.5B multiply-adds (automl).
"""

from scaledet_jax import defaults


def get_config():
    return defaults.efficientdet_config("d7")
