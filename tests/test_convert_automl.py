"""google/automl EfficientDet TF checkpoints through ``python -m scaledet_jax.convert --from=automl``.

A random effdet ``tf_efficientdet_d0`` / ``_d1`` (random init, randomised BN statistics and biases) is
written as automl's checkpoint by ``automl_reference.py`` (automl's variable names and layouts, read from
its source; D0 and D1 with ExponentialMovingAverage shadows holding the weights and random plain values, as
automl's trainer leaves them), converted through the CLI (``tf.train.load_checkpoint``,
no automl install), and run: class and box outputs at every level must equal effdet's within 1e-4 (fp32).
"""

import json

import jax
import numpy as np
import pytest
from automl_reference import automl_variables, write_automl_checkpoint
from configs_util import load_config, run_convert
from torch_reference import randomize_

from scaledet_jax.convert import checkpoint, tf_checkpoint
from scaledet_jax.convert.layouts import _compare_detector, _effdet_reference
from scaledet_jax.models import build_model
from scaledet_jax.tools import profile

TOLERANCE = 1e-4
SIZE = 256


@pytest.fixture(scope="module")
def d0_checkpoint(tmp_path_factory):
    """(effdet D0 reference, automl checkpoint directory with EMA shadows)."""
    config = load_config("efficientdet_d0")
    reference = _effdet_reference("tf_efficientdet_d0", config, SIZE)
    randomize_(reference, np.random.RandomState(0).normal(size=(4, SIZE, SIZE, 3)).astype(np.float32))
    directory = tmp_path_factory.mktemp("automl") / "efficientdet-d0"
    write_automl_checkpoint(automl_variables(reference, "efficientnet-b0"), str(directory), ema_seed=1)
    return reference, directory


def _check_conversion(reference, directory, variant: str, tmp_path, ema: bool) -> dict:
    out = tmp_path / "converted"
    result = run_convert(
        "--from=automl",
        f"--config=configs/efficientdet_{variant}.py",
        f"--input={directory}",
        f"--output={out}",
        f"--image_size={SIZE}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.load(open(out / "conversion.json"))
    config = load_config(f"efficientdet_{variant}")
    checkpoint.apply_model_options(config, str(out))
    assert config.model.num_classes == 90 and config.model.background_slot is False
    model = build_model(config.model)
    shapes = profile.abstract_variables(model, SIZE)
    assert info["mapped"] == len(jax.tree_util.tree_leaves(shapes))  # every variable of ours filled
    reasons = [reason for _, reason in info["ignored"]]
    superseded = sum("ExponentialMovingAverage shadow is used" in r for r in reasons)
    assert "training step counter" in reasons
    zeros = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), dict(shapes))
    variables, _, kept = checkpoint.merge_into(zeros, checkpoint.load_converted(str(out)))
    assert kept == 0
    assert profile.count_params(variables["params"]) == sum(p.numel() for p in reference.parameters())
    images = np.random.RandomState(2).normal(size=(1, SIZE, SIZE, 3)).astype(np.float32)
    diffs = _compare_detector(reference, model, variables, images)
    print(
        f"\nautoml {variant} @{SIZE} (EMA shadows: {ema}, {superseded} plain values superseded): max abs diff {diffs}"
    )
    assert max(diffs.values()) <= TOLERANCE, diffs
    return {"superseded": superseded, "mapped": info["mapped"]}


def test_automl_d0_checkpoint_with_ema_shadows_converts_with_parity(d0_checkpoint, tmp_path):
    reference, directory = d0_checkpoint
    report = _check_conversion(reference, directory, "d0", tmp_path, ema=True)
    # Every plain variable has a shadow (automl averages weights and BN statistics); the attention scalars
    # are stacked into one vector per node, so the count of superseded values exceeds the mapped tensors.
    assert report["superseded"] > report["mapped"]


def test_automl_d1_checkpoint_with_ema_shadows_converts_with_parity(tmp_path):
    config = load_config("efficientdet_d1")
    reference = _effdet_reference("tf_efficientdet_d1", config, SIZE)
    randomize_(reference, np.random.RandomState(0).normal(size=(4, SIZE, SIZE, 3)).astype(np.float32))
    directory = tmp_path / "efficientdet-d1"
    write_automl_checkpoint(automl_variables(reference, "efficientnet-b1"), str(directory), ema_seed=2)
    report = _check_conversion(reference, directory, "d1", tmp_path, ema=True)
    assert report["superseded"] > report["mapped"]


def test_tf_reader_prefers_shadows_and_falls_back_to_plain_values(tmp_path):
    """A variable with a shadow is read from it (its plain value listed as ignored); without shadows, as it is."""
    variables = {"a/kernel": np.full((2, 2), 1.0, np.float32), "b/bias": np.full((3,), 2.0, np.float32)}
    write_automl_checkpoint(variables, str(tmp_path / "plain"), ema_seed=None)
    state, ignored = tf_checkpoint.load(str(tmp_path / "plain"), lambda key: None, "/ExponentialMovingAverage")
    assert sorted(state) == ["a/kernel", "b/bias", "global_step"] and not ignored
    assert np.array_equal(state["a/kernel"], variables["a/kernel"])

    write_automl_checkpoint(variables, str(tmp_path / "ema"), ema_seed=3)
    state, ignored = tf_checkpoint.load(str(tmp_path / "ema"), lambda key: None, "/ExponentialMovingAverage")
    assert sorted(state) == ["a/kernel", "b/bias", "global_step"]
    assert np.array_equal(state["a/kernel"], variables["a/kernel"]) and np.array_equal(
        state["b/bias"], variables["b/bias"]
    )
    assert sorted(key for key, _ in ignored) == ["a/kernel", "b/bias"]
    state, _ = tf_checkpoint.load(str(tmp_path / "ema"), lambda key: None, None)  # shadows not preferred: both kept
    assert "a/kernel/ExponentialMovingAverage" in state and not np.array_equal(state["a/kernel"], variables["a/kernel"])


def test_automl_checkpoint_with_another_variants_config_is_refused(d0_checkpoint, tmp_path):
    _, directory = d0_checkpoint
    out = tmp_path / "converted"
    result = run_convert(
        "--from=automl", "--config=configs/efficientdet_d1.py", f"--input={directory}", f"--output={out}"
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "efficientnet-b0" in result.stderr and "configs/efficientdet_d0.py" in result.stderr
    assert not out.exists()


def test_tf_checkpoint_paths_name_their_prefix(d0_checkpoint):
    _, directory = d0_checkpoint
    prefix = str(directory / "model")
    for given in (directory, prefix, prefix + ".index", prefix + ".data-00000-of-00001"):
        assert tf_checkpoint.resolve_prefix(str(given)) == prefix


def test_tf_checkpoint_mistakes_get_one_line(d0_checkpoint, tmp_path):
    _, directory = d0_checkpoint
    empty = tmp_path / "empty"
    empty.mkdir()
    truncated = tmp_path / "truncated"  # the index copied without its data shard
    truncated.mkdir()
    (truncated / "model.index").write_bytes((directory / "model.index").read_bytes())
    (truncated / "checkpoint").write_text('model_checkpoint_path: "model"\n')
    for source, message in (
        (empty, "is a directory without a TF checkpoint"),
        (tmp_path / "missing" / "ckpt-1", "not found"),
        (truncated, "no .data-* shard"),
    ):
        out = tmp_path / f"out_{source.name}"
        result = run_convert(
            "--from=automl", "--config=configs/efficientdet_d0.py", f"--input={source}", f"--output={out}"
        )
        assert result.returncode != 0 and "Traceback" not in result.stderr and message in result.stderr, result.stderr
        assert not out.exists()
