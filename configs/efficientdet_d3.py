"""EfficientDet-D3 on COCO, google/automl's architecture and recipe.

Command:   python main.py --config=configs/efficientdet_d3.py --workdir=runs/efficientdet_d3
Profile:   python -m scaledet_jax.tools.profile --config=configs/efficientdet_d3.py
Published: 46.8 AP (COCO val, 300 epochs); 12.0M params, 25.0B multiply-adds (automl).
"""

from scaledet_jax import defaults


def get_config():
    return defaults.efficientdet_config("d3")
