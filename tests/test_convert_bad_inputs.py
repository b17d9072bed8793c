"""The converter's refusals (issue 16 items 7, 8, 14): NaN/Inf tensors, ``--overwrite`` of anything but a
converted checkpoint, a directory as ``--input`` and an unwritable output — one line each, before the slow
work where possible, and nothing half-written or lost.

The converter runs in-process (``convert_checkpoint``, what the CLI's ``main`` calls) on a small effdet D0
shaped like configs/efficientdet_quickstart.py; one subprocess run checks the CLI's one-line exit.
"""

import json
import os
import shutil
import subprocess
import sys

import effdet
import jax
import numpy as np
import pytest
import torch
from configs_util import CONFIG_DIR, load_config

from scaledet_jax.cli import UserError
from scaledet_jax.convert import checkpoint
from scaledet_jax.convert.__main__ import convert_checkpoint

ROOT = str(CONFIG_DIR.parent)
CONFIG = "configs/efficientdet_quickstart.py"
NAN_KEY = "class_net.predict.conv_pw.weight"  # mapped tensors (not ignored ones)
INF_KEY = "backbone.bn1.running_var"


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """good.pth: an effdet D0 (3 classes, levels 3-5) state dict; bad.pth: the same with a NaN in one
    tensor and an Inf in another."""
    cfg = effdet.get_efficientdet_config("tf_efficientdet_d0")
    cfg.num_classes, cfg.max_level, cfg.num_levels, cfg.image_size = 3, 5, 3, (128, 128)
    state = effdet.EfficientDet(cfg, pretrained_backbone=False).state_dict()
    directory = tmp_path_factory.mktemp("sources")
    torch.save(state, directory / "good.pth")
    bad = {k: v.clone() for k, v in state.items()}
    bad[NAN_KEY].view(-1)[[0, 5]] = float("nan")
    bad[INF_KEY][1] = float("inf")
    torch.save(bad, directory / "bad.pth")
    return directory


def _convert(source, output, overwrite=False):
    return convert_checkpoint(
        "effdet", load_config("efficientdet_quickstart"), CONFIG, str(source), str(output), overwrite=overwrite
    )


def _refused(match, source, output, overwrite=False):
    with pytest.raises(UserError, match=match) as error:
        _convert(source, output, overwrite)
    message = str(error.value)
    assert "\n" not in message, message
    return message


@pytest.fixture(scope="module")
def converted(sources, tmp_path_factory):
    """A converted checkpoint of good.pth (tests copy it before changing anything)."""
    output = tmp_path_factory.mktemp("converted") / "d0"
    _convert(sources / "good.pth", output)
    return output


def _copy(converted, where):
    shutil.copytree(converted, where)
    return where


def _snapshot(directory):
    """Every file under ``directory`` with its bytes: equal snapshots mean nothing changed."""
    files = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            files[os.path.relpath(path, directory)] = open(path, "rb").read()
    return files


def _no_leftovers(parent, *expected):
    assert sorted(os.listdir(parent)) == sorted(expected), os.listdir(parent)  # no .partial- / .replaced- dirs


def _never_load(monkeypatch):
    def fail(path):
        raise AssertionError(f"the checkpoint {path} was loaded before the output was checked")

    monkeypatch.setattr(checkpoint, "load_state_dict", fail)


# --- 7: NaN / Inf --------------------------------------------------------------------------------------------


def test_nan_and_inf_tensors_are_refused_by_name_and_nothing_is_written(sources, tmp_path):
    message = _refused("hold NaN/Inf", sources / "bad.pth", tmp_path / "out")
    assert "2 source tensors hold NaN/Inf" in message
    assert f"{NAN_KEY} (2 NaN)" in message and f"{INF_KEY} (1 Inf)" in message
    _no_leftovers(tmp_path)


def test_many_nonfinite_tensors_are_listed_first_few_plus_count(tmp_path):
    from scaledet_jax.convert import torch_layout

    state = {f"layer{i}.weight": np.full((2, 2), np.nan if i % 2 else np.inf, np.float32) for i in range(8)}
    state["ok.weight"] = np.ones((2, 2), np.float32)
    targets = {"params": {k.split(".")[0]: {"kernel": np.zeros((2, 2))} for k in state}}
    with pytest.raises(torch_layout.NonFiniteError) as error:
        torch_layout.convert(state, targets, lambda path: f"{path[1]}.weight")
    message = str(error.value)
    assert "\n" not in message and message.startswith("8 source tensors hold NaN/Inf: layer0.weight (4 Inf), ")
    assert "layer4.weight" in message and "layer5.weight" not in message and "and 3 more" in message
    assert "ok.weight" not in message

    # The writer refuses non-finite variables itself too (e.g. from a layout's transform), naming them.
    variables = {"params": {"head": {"kernel": np.array([1.0, np.nan, np.inf], np.float32)}, "b": np.ones(2)}}
    with pytest.raises(UserError, match=r"1 converted variables hold NaN/Inf: params/head/kernel \(1 NaN, 1 Inf\)"):
        checkpoint.save_converted(str(tmp_path / "out"), variables, {"layout": "x", "source": "y", "mapped": 1})
    _no_leftovers(tmp_path)


# --- 8: --overwrite -----------------------------------------------------------------------------------------


def test_overwrite_replaces_a_previous_converted_checkpoint(sources, converted, tmp_path):
    output = _copy(converted, tmp_path / "d0")
    info = json.load(open(output / "conversion.json"))
    json.dump({**info, "marker": "previous"}, open(output / "conversion.json", "w"))
    _refused("already holds a converted checkpoint; pass --overwrite", sources / "good.pth", output)
    assert "marker" in json.load(open(output / "conversion.json"))  # refused: untouched

    _convert(sources / "good.pth", output, overwrite=True)
    new_info = json.load(open(output / "conversion.json"))
    assert "marker" not in new_info and new_info["mapped"] == info["mapped"]
    leaves_new = jax.tree_util.tree_leaves(checkpoint.load_converted(str(output)))
    leaves_old = jax.tree_util.tree_leaves(checkpoint.load_converted(str(converted)))
    assert len(leaves_new) == len(leaves_old) == info["mapped"]
    assert all(np.array_equal(x, y) for x, y in zip(leaves_new, leaves_old, strict=True))
    _no_leftovers(tmp_path, "d0")


def test_overwrite_refuses_anything_but_a_converted_checkpoint(sources, converted, tmp_path, monkeypatch):
    _never_load(monkeypatch)  # every refusal comes before the load
    good = sources / "good.pth"

    foreign = tmp_path / "experiments"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    message = _refused("not a converted checkpoint", good, foreign, overwrite=True)
    assert "notes.txt" in message and "--overwrite only replaces" in message
    assert (foreign / "notes.txt").read_text() == "keep me"

    fake = tmp_path / "fake"  # a conversion.json that this converter did not write
    fake.mkdir()
    (fake / "conversion.json").write_text(json.dumps({"some": "thing"}))
    _refused("not a converted checkpoint", good, fake, overwrite=True)
    assert (fake / "conversion.json").exists()

    extra = _copy(converted, tmp_path / "extra")  # ours, plus a file the user put in it
    (extra / "README.md").write_text("my notes")
    message = _refused("but also README.md, which --overwrite would delete", good, extra, overwrite=True)
    assert (extra / "README.md").read_text() == "my notes" and (extra / "conversion.json").exists()

    a_file = tmp_path / "model.ckpt"
    a_file.write_text("data")
    _refused("exists and is not a directory", good, a_file, overwrite=True)
    assert a_file.read_text() == "data"

    _refused("holding other things", good, foreign)  # without --overwrite too


def test_failed_conversion_or_write_with_overwrite_keeps_the_previous_checkpoint(
    sources, converted, tmp_path, monkeypatch
):
    output = _copy(converted, tmp_path / "d0")
    before = _snapshot(output)

    message = _refused("hold NaN/Inf", sources / "bad.pth", output, overwrite=True)  # fails in the mapping
    assert "nothing written" in message
    assert _snapshot(output) == before
    _no_leftovers(tmp_path, "d0")

    # Failures inside the writer: after the new variables are written (json), and at the final swap.
    variables = {"params": {"w": np.ones(3, np.float32)}}
    info = {"layout": "effdet", "source": "x", "mapped": 1}

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint.json, "dump", disk_full)
        with pytest.raises(OSError, match="No space left"):
            checkpoint.save_converted(str(output), variables, info, overwrite=True)
    assert _snapshot(output) == before
    _no_leftovers(tmp_path, "d0")

    rename = os.rename

    def failing_swap(src, dst):
        if str(dst) == str(output) and ".partial-" in os.path.basename(src):
            raise OSError(5, "Input/output error")
        return rename(src, dst)

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint.os, "rename", failing_swap)
        with pytest.raises(OSError, match="Input/output error"):
            checkpoint.save_converted(str(output), variables, info, overwrite=True)
    assert _snapshot(output) == before  # the previous one was moved aside and put back
    _no_leftovers(tmp_path, "d0")

    checkpoint.save_converted(str(output), variables, info, overwrite=True)  # and a working swap replaces it
    assert json.load(open(output / "conversion.json")) == info
    np.testing.assert_array_equal(checkpoint.load_converted(str(output))["params"]["w"], np.ones(3))
    _no_leftovers(tmp_path, "d0")


# --- 14: a directory as --input, an unwritable output -------------------------------------------------------


def test_a_directory_as_input_names_the_checkpoint_files_inside(tmp_path, monkeypatch):
    _never_load(monkeypatch)
    folder = tmp_path / "hub_download"
    (folder / "sub").mkdir(parents=True)
    for name in ("model.safetensors", "pytorch_model.bin", "config.json", "README.md", "sub/d0.pth"):
        (folder / name).write_text("x")
    message = _refused("is a directory; pass the checkpoint file inside it, e.g. ", folder, tmp_path / "out")
    assert f"{folder}/model.safetensors, {folder}/pytorch_model.bin, {folder}/sub/d0.pth" in message
    assert "config.json" not in message and "README" not in message

    (folder / "sub" / "e.pt").write_text("x")
    assert "(4 found)" in _refused("is a directory", folder, tmp_path / "out")

    empty = tmp_path / "empty"
    empty.mkdir()
    _refused(r"is a directory with no \.pth/\.pt/\.bin/\.safetensors file in it", empty, tmp_path / "out")
    _refused("not found", tmp_path / "missing.pth", tmp_path / "out")
    _no_leftovers(tmp_path, "hub_download", "empty")


def test_an_unwritable_output_is_refused_before_loading(sources, tmp_path, monkeypatch):
    _never_load(monkeypatch)
    good = sources / "good.pth"
    a_file = tmp_path / "results.txt"
    a_file.write_text("x")
    _refused(f"cannot create output .*: '{a_file}' is a file, not a directory", good, a_file / "d0")
    _refused(f"'{a_file}' is a file", good, a_file / "deeper" / "d0")

    # Tests run as root, where chmod does not stop writes: os.access answers as it would for a user.
    read_only = tmp_path / "shared"
    read_only.mkdir()
    access = os.access

    def no_write_in_shared(path, mode, **kwargs):
        return False if os.path.abspath(path) == str(read_only) and mode & os.W_OK else access(path, mode, **kwargs)

    monkeypatch.setattr(checkpoint.os, "access", no_write_in_shared)
    _refused(f"directory '{read_only}' is not writable; choose another path", good, read_only / "d0")
    _refused("is not writable", good, read_only / "new" / "d0")  # the nearest existing ancestor decides
    _no_leftovers(tmp_path, "results.txt", "shared")
    assert os.listdir(read_only) == []


def test_cli_prints_one_line_and_exits_2(tmp_path):
    """The same refusals through ``python -m scaledet_jax.convert``: `prog: error: ...`, no traceback."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "scaledet_jax.convert",
            "--from=effdet",
            f"--config={CONFIG}",
            f"--input={tmp_path}",
            f"--output={tmp_path / 'out'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert errors == [
        f"scaledet_jax.convert: error: checkpoint '{tmp_path}' is a directory with no "
        ".pth/.pt/.bin/.safetensors file in it; pass the checkpoint file itself"
    ], result.stderr
    assert "Traceback" not in result.stderr and not os.path.exists(tmp_path / "out")
