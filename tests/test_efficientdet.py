"""EfficientDet D0-D7x: automl's exact parameter counts and multiply-adds, and parity with effdet.

effdet (PyPI) reproduces automl's networks in PyTorch with TF 'SAME' padding; its random-init
``tf_efficientdet_*`` models (every bias, BN and fusion weight randomised, BN statistics
recalibrated) are converted into ours by ``scaledet_jax.convert.effdet`` and both run for real.
"""

import effdet
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from configs_util import load_config
from torch_reference import nhwc, randomize_

from scaledet_jax import nn as snn
from scaledet_jax.backbones import efficientnet
from scaledet_jax.convert import effdet as effdet_layout
from scaledet_jax.convert import torch_layout
from scaledet_jax.models import build_model
from scaledet_jax.necks import bifpn
from scaledet_jax.tools import profile

TOLERANCE = 1e-4

# automl efficientdet_arch_test.py, 90 classes.
AUTOML_PARAMS = {
    "d0": 3_880_067,
    "d1": 6_625_898,
    "d2": 8_097_039,
    "d3": 12_032_296,
    "d4": 20_723_675,
    "d5": 33_653_315,
    "d6": 51_871_782,
    "d7": 51_871_782,
}
AUTOML_MACS = {"d0": 2_550_618_821, "d1": 6_133_752_112, "d2": 11_045_799_933, "d3": 24_982_737_931}

# (variant, parity input size): D0/D1 at their native sizes, the rest small (multiples of 2**max_level).
PARITY = [
    ("d0", 512),
    ("d1", 640),
    ("d2", 128),
    ("d3", 128),
    ("d4", 128),
    ("d5", 128),
    ("d6", 128),
    ("d7", 128),
    ("d7x", 256),
]


def _params(config, size=128):
    return profile.count_params(profile.abstract_variables(build_model(config.model), size)["params"])


@pytest.mark.parametrize("variant", sorted(AUTOML_PARAMS))
def test_trainable_parameters_equal_automl(variant):
    assert _params(load_config(f"efficientdet_{variant}")) == AUTOML_PARAMS[variant]


def test_d7x_parameters_within_half_a_percent_of_77m():
    assert abs(_params(load_config("efficientdet_d7x"), 256) / 77.0e6 - 1) < 0.005


@pytest.mark.parametrize("variant", sorted(AUTOML_MACS))
def test_multiply_adds_within_2_percent_of_automl(variant):
    config = load_config(f"efficientdet_{variant}")
    model = build_model(config.model)
    size = config.model.image_size
    with snn.depthwise_impl("conv"):
        macs = profile.tf_convention_flops(model, profile.abstract_variables(model, size), size)
    assert abs(macs / AUTOML_MACS[variant] - 1) < 0.02, (macs, AUTOML_MACS[variant])


def test_bifpn_graph_equals_effdet_and_automl():
    ours = bifpn.bifpn_nodes(3, 7)
    # automl fpn_configs.bifpn_config(3, 7): P6td, P5td, P4td, P3out, P4out, P5out, P6out, P7out.
    assert ours == [
        (6, (3, 4)),
        (5, (2, 5)),
        (4, (1, 6)),
        (3, (0, 7)),
        (4, (1, 7, 8)),
        (5, (2, 6, 9)),
        (6, (3, 5, 10)),
        (7, (4, 11)),
    ]
    for lo, hi in ((3, 7), (3, 8), (2, 6)):
        theirs = effdet.config.fpn_config.bifpn_config(lo, hi).nodes
        assert bifpn.bifpn_nodes(lo, hi) == [(n["feat_level"], tuple(n["inputs_offsets"])) for n in theirs]


def test_efficientnet_scaling_rules():
    # Stem and final widths and block counts of B0..B7 (EfficientNet paper / automl builder).
    expected = {
        "b0": (32, 320, 16),
        "b1": (32, 320, 23),
        "b2": (32, 352, 23),
        "b3": (40, 384, 26),
        "b4": (48, 448, 32),
        "b5": (48, 512, 39),
        "b6": (56, 576, 45),
        "b7": (64, 640, 55),
    }
    for name, (stem, last, blocks) in expected.items():
        width, depth, _, _ = efficientnet.VARIANTS[name]
        plan = efficientnet.plan_blocks(width, depth)
        assert (efficientnet.round_filters(32, width), plan[-1].out_filters, len(plan)) == (stem, last, blocks), name


def _effdet_pair(variant, size, padding="same"):
    reference = effdet.create_model(
        f"tf_efficientdet_{variant}", pretrained=False, pretrained_backbone=False, image_size=(size, size)
    )
    # Enough calibration images that the coarsest level (1x1 at 128) gets sound BN statistics.
    batch = 2 if size >= 512 else 8
    randomize_(reference, np.random.RandomState(0).normal(0, 1, (batch, size, size, 3)).astype(np.float32))
    config = load_config(f"efficientdet_{variant}")
    config.model.image_size = size
    config.model.conv_padding = config.model.pool_padding = padding
    model = build_model(config.model)
    state = reference.state_dict()
    shapes = profile.abstract_variables(model, size)
    variables, report = torch_layout.convert(
        state, shapes, effdet_layout.effdet_source(state.keys(), shapes), effdet_layout.effdet_ignored
    )
    return reference, model, variables, report


@pytest.mark.parametrize("variant,size", PARITY, ids=[f"{v}@{s}" for v, s in PARITY])
def test_parity_with_effdet(variant, size):
    reference, model, variables, report = _effdet_pair(variant, size)
    assert all(reason for _, reason in report.ignored)
    images = np.random.RandomState(1).normal(0, 1, (1, size, size, 3)).astype(np.float32)
    with torch.no_grad():
        class_ref, box_ref = reference(torch.from_numpy(images).permute(0, 3, 1, 2))
    outputs = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, jnp.asarray(images))
    levels = sorted(outputs["class_outputs"])
    assert len(levels) == len(class_ref)
    worst = {"class": 0.0, "box": 0.0}
    for level, cls, box in zip(levels, class_ref, box_ref, strict=True):
        for kind, ours, theirs in (
            ("class", outputs["class_outputs"][level], cls),
            ("box", outputs["box_outputs"][level], box),
        ):
            theirs = nhwc(theirs)
            assert np.asarray(ours).shape == theirs.shape
            assert np.std(theirs) > 0.05  # outputs vary: the comparison is not of constants
            diff = float(np.max(np.abs(np.asarray(ours) - theirs)))
            assert diff <= TOLERANCE, f"{variant} level {level}: max abs diff {diff:.2e}"
            worst[kind] = max(worst[kind], diff)
    print(
        f"\nparity effdet tf_efficientdet_{variant}@{size}: "
        f"max abs diff class {worst['class']:.1e} box {worst['box']:.1e}"
    )


def test_symmetric_padding_breaks_parity_with_tf_same():
    # Negative control: effdet's 'SAME' model vs ours with PyTorch-symmetric padding must differ.
    reference, model, variables, _ = _effdet_pair("d0", 256, padding="symmetric")
    images = np.random.RandomState(1).normal(0, 1, (1, 256, 256, 3)).astype(np.float32)
    with torch.no_grad():
        class_ref, _ = reference(torch.from_numpy(images).permute(0, 3, 1, 2))
    outputs = model.apply(variables, jnp.asarray(images), train=False)
    diff = float(np.max(np.abs(np.asarray(outputs["class_outputs"][3]) - nhwc(class_ref[0]))))
    assert diff > 100 * TOLERANCE


def test_conversion_refuses_a_mismatched_checkpoint():
    reference, model, _, _ = _effdet_pair("d0", 128)
    state = dict(reference.state_dict())
    del state["fpn.cell.0.fnode.0.combine.edge_weights"]
    state["class_net.extra.weight"] = torch.zeros(3)
    state["box_net.predict.conv_pw.bias"] = torch.zeros(5)
    shapes = profile.abstract_variables(model, 128)
    with pytest.raises(torch_layout.ConversionError) as error:
        torch_layout.convert(
            state, shapes, effdet_layout.effdet_source(state.keys(), shapes), effdet_layout.effdet_ignored
        )
    message = str(error.value)
    assert "1 missing" in message and "cell_0/node_0/weights" in message
    assert "1 unexpected" in message and "class_net.extra.weight" in message
    assert "1 mis-shaped" in message and "box_net.predict.conv_pw.bias: (5,)" in message
