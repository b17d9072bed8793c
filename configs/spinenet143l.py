"""SpineNet-143L (SpineNet-143 with filter scale 1.3) RetinaNet on COCO, TF Model Garden recipe at 1280x1280.

Command:   python main.py --config=configs/spinenet143l.py --workdir=runs/spinenet143l
Profile:   python -m scaledet_jax.tools.profile --config=configs/spinenet143l.py
Published: no published RetinaNet AP (Model Garden scaling-map variant); n/a params, n/a multiply-adds.
"""

from scaledet_jax import defaults


def get_config():
    config = defaults.get_config()
    config.model.backbone.model_id = "143L"
    config.model.image_size = 1280
    config.model.anchor.anchor_size = 4.0
    config.optim.gradient_clip_norm = 10.0
    return config
