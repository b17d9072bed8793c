"""EfficientDet-D7x on COCO, google/automl's architecture and recipe.

Command:   python main.py --config=configs/efficientdet_d7x.py --workdir=runs/efficientdet_d7x
Profile:   python -m scaledet_jax.tools.profile --config=configs/efficientdet_d7x.py
Published: 54.4 AP (COCO val, 300 epochs); 77.0M params, 410B multiply-adds (automl).
"""

from scaledet_jax import defaults


def get_config():
    return defaults.efficientdet_config("d7x")
