"""Faster R-CNN quickstart: the quickstart's small SpineNet-49S backbone with an RPN and a box head,
learning the built-in synthetic shapes at 128x128.

Command: python main.py --config=configs/fasterrcnn_quickstart.py --workdir=runs/fasterrcnn_quickstart
Generates the dataset, trains and evaluates on the held-out split; README has the measured time and AP.
SpineNet's endpoints feed the RPN and RoIAlign directly (no FPN), as in Model Garden's Mask R-CNN SpineNet.
"""

from scaledet_jax import defaults


def get_config():
    return defaults.fasterrcnn_quickstart_config()
