"""The params/FLOPs tool: FLOPs against the published numbers and TF's profiler, and its CLI."""

import subprocess
import sys

import pytest
from configs_util import CONFIG_DIR, load_config
from model_garden import build_retinanet_spinenet, tf_profiler_multiply_adds

from scaledet_jax.tools import profile

# Published multiply-adds at 640 (SpineNet paper / legacy MODEL_ZOO); Mask R-CNN SpineNet-49S: the paper's
# 60.2B (the seed's get_flops prints 63.77B).
PUBLISHED_MACS = {"spinenet49": 85.4e9, "maskrcnn_spinenet49s": 60.2e9}


def test_spinenet49_flops_within_3_percent_of_published():
    result = profile.profile(load_config("spinenet49"))
    assert result["image_size"] == 640
    assert abs(result["multiply_adds"] / PUBLISHED_MACS["spinenet49"] - 1) < 0.03


def test_maskrcnn_spinenet49s_flops_within_3_percent_of_published():
    """The seed's network (81 classes) at 640: backbone, RPN, proposals, the box head on 1000 proposals and
    the mask head on 100 RoIs (mmdetection's get_flops), TF profiler rules (jaxpr only, nothing compiled)."""
    from scaledet_jax.models import build_model

    config = load_config("maskrcnn_spinenet49s")
    config.model.num_classes = 81
    model = build_model(config.model)
    variables = profile.abstract_variables(model, 640)
    assert profile.count_params(variables["params"]) == 13_916_084
    macs = profile.tf_convention_flops(model, variables, 640)
    assert abs(macs / PUBLISHED_MACS["maskrcnn_spinenet49s"] - 1) < 0.03, macs


@pytest.mark.parametrize("config_name,model_id", [("spinenet49s", "49S"), ("spinenet49", "49")])
def test_flops_match_tf_profiler_on_model_garden_build(config_name, model_id):
    # Our count applies TF profiler's rules to our jaxpr; it lands within 0.5% of TF's profiler on
    # Model Garden's build (the remainder: op-level details such as TF's fused pad/conv). 3% is the bound.
    config = load_config(config_name)
    keras_model, _ = build_retinanet_spinenet(model_id, 640, config.model.head.num_filters)
    reference = tf_profiler_multiply_adds(keras_model, 640)
    ours = profile.profile(config)["multiply_adds"]
    assert abs(ours / reference - 1) < 0.03, (ours, reference)


def _run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "scaledet_jax.tools.profile", *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=CONFIG_DIR.parent,
    )


def test_cli_prints_table():
    result = _run_cli("--config=configs/spinenet49s.py", "--image_size=256")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "configs/spinenet49s.py @ 256x256"
    rows = {line.split()[0]: line.split()[-1] for line in lines[1:] if line.strip()}
    assert rows["backbone"] == "9,089,215"
    assert rows["head"] == "2,176,727"
    assert rows["total"] == "11,265,942"
    assert "FLOPs (multiply-adds)" in result.stdout
    flops = {
        line.split()[0]: float(line.split()[3].rstrip("B")) for line in lines if line.strip().startswith(("TF", "XLA"))
    }
    assert set(flops) == {"TF", "XLA"} and all(4.0 < v < 6.0 for v in flops.values()), flops


@pytest.mark.parametrize(
    "args,message",
    [
        ([], "--config is required"),
        (["--config=configs/no_such.py"], "config file 'configs/no_such.py' not found"),
        (["--config=configs/spinenet49s.py", "--image_size=200"], "multiples of 128"),
        (["--config=configs/spinenet49s.py", "--config.model.imag_size=256"], 'Did you mean "image_size"'),
        (["--config=configs/spinenet49s.py", "--config.model.image_size=big"], "invalid literal for int()"),
    ],
)
def test_cli_bad_input_gets_one_clear_line(args, message):
    result = _run_cli(*args)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.stderr
