"""Mask R-CNN SpineNet parameter counts: ours (configs/maskrcnn_spinenet49.py, and SpineNet-143 in the
same recipe) against TF Model Garden's ``maskrcnn_spinenet_coco`` Keras build (random init, nothing
downloaded), part by part, and both against REFERENCE.md's numbers. Counts do not depend on the input
size, so both sides are built at 128 px.
"""

import jax
import pytest
from configs_util import load_config
from model_garden import build_maskrcnn_spinenet, maskrcnn_part_counts

from scaledet_jax.models import build_model
from scaledet_jax.tools import profile

# REFERENCE.md: SpineNet-49 total 40,753,521 (RPN 596,495, box head 15,676,871, mask head 2,648,667),
# backbone as in its SpineNet table; SpineNet-143 total 79,169,649. The identity decoder has no weights.
REFERENCE = {"49": (21_831_488, 40_753_521), "143": (60_247_616, 79_169_649)}
HEADS = {"rpn_head": 596_495, "detection_head": 15_676_871, "mask_head": 2_648_667}
OUR_PART = {"backbone": "backbone", "rpn_head": "rpn_head", "detection_head": "box_head", "mask_head": "mask_head"}


def _count(tree) -> int:
    return sum(x.size for x in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize("model_id", ["49", "143"])
def test_maskrcnn_spinenet_counts_equal_model_garden(model_id):
    model, units = build_maskrcnn_spinenet(model_id, 128)
    theirs = maskrcnn_part_counts(model)
    backbone, total = REFERENCE[model_id]
    assert theirs == {"backbone": backbone, "decoder": 0, **HEADS, "total": total}
    # Every trainable variable is reachable through the recorded units a converter reads.
    recorded = {v.ref() for unit in units for v in unit.variables}
    assert all(v.ref() in recorded for v in model.trainable_weights)

    config = load_config("maskrcnn_spinenet49")
    config.model.backbone.model_id = model_id
    ours = profile.abstract_variables(build_model(config.model), 128)["params"]
    assert {k: _count(ours[v]) for k, v in OUR_PART.items()} == {k: theirs[k] for k in OUR_PART}
    assert _count(ours) == total
