"""The checkpoint converter: CLI, safe loading, strict mapping, parity, and the round trip through main.py.

Every PyTorch model here is real (effdet, timm), random-init with randomised biases/BN (see
torch_reference.py), saved with torch.save / safetensors as a user would hold it.
"""

import json
import os
import subprocess
import sys

import effdet
import jax
import numpy as np
import pytest
import timm
import torch
from configs_util import CONFIG_DIR, load_config, photo_like
from torch_reference import randomize_

from scaledet_jax.cli import UserError
from scaledet_jax.convert import checkpoint
from scaledet_jax.models import build_model
from scaledet_jax.tools import profile

ROOT = str(CONFIG_DIR.parent)
TOLERANCE = 1e-4


def _convert(*args):
    return subprocess.run(
        [sys.executable, "-m", "scaledet_jax.convert", *args], capture_output=True, text=True, timeout=900, cwd=ROOT
    )


def _main(*args):
    return subprocess.run([sys.executable, "main.py", *args], capture_output=True, text=True, timeout=900, cwd=ROOT)


def _one_error_line(result, message):
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and message in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def small_effdet(tmp_path_factory):
    """effdet D0 shaped like configs/efficientdet_quickstart.py (3 classes, levels 3-5, 128 px), as a .pth."""
    cfg = effdet.get_efficientdet_config("tf_efficientdet_d0")
    cfg.num_classes, cfg.max_level, cfg.num_levels, cfg.image_size = 3, 5, 3, (128, 128)
    model = effdet.EfficientDet(cfg, pretrained_backbone=False)
    randomize_(model, np.random.RandomState(0).normal(size=(8, 128, 128, 3)).astype(np.float32))
    path = tmp_path_factory.mktemp("effdet") / "d0_small.pth"
    torch.save({"meta": {"epoch": 3}, "state_dict": model.state_dict(), "optimizer": {"lr": torch.tensor(0.1)}}, path)
    return path


def test_effdet_converts_with_parity_and_report(small_effdet, tmp_path):
    out = tmp_path / "converted"
    result = _convert(
        "--from=effdet",
        "--config=configs/efficientdet_quickstart.py",
        f"--input={small_effdet}",
        f"--output={out}",
        "--reference=tf_efficientdet_d0",
        "--overwrite",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tensors mapped" in result.stdout and "batch-norm step counter" in result.stdout
    info = json.load(open(out / "conversion.json"))
    ours = profile.abstract_variables(build_model(load_config("efficientdet_quickstart").model), 128)
    assert info["layout"] == "effdet" and info["mapped"] == len(jax.tree_util.tree_leaves(ours))  # every variable
    assert {reason for _, reason in info["ignored"]} >= {
        "batch-norm step counter",
        "checkpoint entry beside 'state_dict'",
    }
    diffs = info["parity"]["max_abs_diff"]
    assert max(diffs.values()) <= TOLERANCE, diffs
    print(f"\nconvert effdet (3 classes, levels 3-5) @128: max abs diff {diffs}")


def test_converted_effdet_gives_detbenchpredicts_detections(small_effdet, tmp_path):
    """End to end on a fixed image (issue 14 item 5): the converter records effdet's post-processing (its
    (1.4, 0.7) anchors, unclipped decoding, top 5000 pairs, no score threshold, NMS 0.5, 100 detections) and our
    predict then gives effdet ``DetBenchPredict``'s detections: same classes, scores within 1e-4, boxes within
    0.01 px. Both sides run the network in float64; effdet post-processes in float32, as we do."""
    from effdet.bench import DetBenchPredict

    from scaledet_jax.tasks import build_task

    out = tmp_path / "converted"
    result = _convert("--from=effdet", "--config=configs/efficientdet_quickstart.py", f"--input={small_effdet}",
                      f"--output={out}")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    config = load_config("efficientdet_quickstart")
    checkpoint.apply_model_options(config, str(out))
    variables = checkpoint.load_converted(str(out))

    cfg = effdet.get_efficientdet_config("tf_efficientdet_d0")
    cfg.num_classes, cfg.max_level, cfg.num_levels, cfg.image_size = 3, 5, 3, (128, 128)
    cfg.anchor_scale = config.model.anchor.anchor_size  # the quickstart's smaller anchors (effdet's D0: 4)
    model = effdet.EfficientDet(cfg, pretrained_backbone=False)
    model.load_state_dict(torch.load(small_effdet, weights_only=True)["state_dict"])
    bench = DetBenchPredict(model.double()).eval()
    images = np.random.RandomState(3).normal(size=(1, 128, 128, 3))
    with torch.no_grad():
        info = {"img_scale": torch.ones(1, dtype=torch.float64), "img_size": torch.tensor([[128.0, 128.0]])}
        theirs = bench(torch.from_numpy(images).permute(0, 3, 1, 2), img_info=info)[0].float().numpy()

    def ours_with(config):
        with jax.enable_x64(True):
            v64 = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), variables)
            found = build_task(config).predict(v64, images)
            return jax.tree_util.tree_map(lambda x: np.asarray(x)[0], found)

    def compare(found):
        valid = found["valid"]
        assert valid.sum() == len(theirs) == 100
        ours = np.concatenate(
            [found["boxes"][valid][:, [1, 0, 3, 2]], found["scores"][valid][:, None], found["classes"][valid][:, None]],
            axis=1,
        )
        ours, reference = (d[np.lexsort((-d[:, 4], d[:, 5]))] for d in (ours, theirs))  # by class, then score
        np.testing.assert_array_equal(ours[:, 5], reference[:, 5])
        np.testing.assert_allclose(ours[:, 4], reference[:, 4], atol=1e-4, rtol=0)
        np.testing.assert_allclose(ours[:, :4], reference[:, :4], atol=0.01, rtol=0)

    compare(ours_with(config))

    # The whole path on a 97 x 150 photo: effdet's transforms_coco_eval (PIL resize to 82 x 128, top left on the
    # mean colour) and loader normalisation, DetBenchPredict with the image's img_scale / img_size (clip, map
    # back), against Detector.predict on the uint8 image with the recorded model.test_resize.
    from effdet.data.transforms import transforms_coco_eval
    from PIL import Image

    from scaledet_jax.detector import Detector

    assert config.model.test_resize.style == "effdet"
    image = photo_like(97, 150, seed=13)
    spec = config.model.input
    transform = transforms_coco_eval(
        128, interpolation="bilinear", use_prefetcher=True, fill_color="mean",
        mean=[m / 255 for m in spec.mean], std=[s / 255 for s in spec.std],
    )  # fmt: skip
    pixels, annotation = transform(Image.fromarray(image), {})
    mean, std = (np.asarray(v, np.float64).reshape(3, 1, 1) for v in (spec.mean, spec.std))
    x = torch.from_numpy((pixels.astype(np.float64) - mean) / std)[None]
    # float32, as effdet's loader collates them (its post-processing runs in float32).
    info = {"img_scale": torch.tensor([annotation["img_scale"]]), "img_size": torch.tensor([[150.0, 97.0]])}
    with torch.no_grad():
        theirs = bench(x, img_info=info)[0].float().numpy()
    with jax.enable_x64(True):
        v64 = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), variables)
        (ours,) = Detector(config, v64, dtype=np.float64).predict(image)
    assert len(ours["scores"]) == len(theirs) == 100
    theirs = theirs[np.lexsort((-theirs[:, 4], theirs[:, 5]))]

    def compare_found(found: dict) -> None:
        ours = np.concatenate([found["boxes"], found["scores"][:, None], found["classes"][:, None]], axis=1)
        ours = ours[np.lexsort((-ours[:, 4], ours[:, 5]))]
        print(f"\neffdet on a 97 x 150 photo: max box diff {np.max(np.abs(ours[:, :4] - theirs[:, :4])):.1e} px")
        np.testing.assert_array_equal(ours[:, 5], theirs[:, 5])
        np.testing.assert_allclose(ours[:, 4], theirs[:, 4], atol=1e-4, rtol=0)
        np.testing.assert_allclose(ours[:, :4], theirs[:, :4], atol=0.01, rtol=0)

    compare_found(ours)
    config.model.test_resize.style = "letterbox"  # negative control: TF bilinear, zero padding
    with jax.enable_x64(True):
        (letterboxed,) = Detector(config, v64, dtype=np.float64).predict(image)
    with pytest.raises(AssertionError):
        compare_found(letterboxed)
    config.model.test_resize.style = "effdet"

    config.model.anchor.aspect_multipliers = ()  # negative control: sqrt(2) anchors move the 2:1 boxes
    with pytest.raises(AssertionError):
        compare(ours_with(config))


def test_effdet_pytorch_trained_family_converts_with_parity(tmp_path):
    """effdet's ``efficientdet_*`` (trained in PyTorch: symmetric padding, backbone BN eps 1e-5, no
    redundant biases) is recognised from its checkpoint and converted with those options."""
    cfg = effdet.get_efficientdet_config("efficientdet_d0")
    cfg.image_size = (128, 128)
    model = effdet.EfficientDet(cfg, pretrained_backbone=False)
    randomize_(model, np.random.RandomState(0).normal(size=(8, 128, 128, 3)).astype(np.float32))
    path = tmp_path / "efficientdet_d0.pth"
    torch.save(model.state_dict(), path)
    out = tmp_path / "converted"
    result = _convert(
        "--from=effdet",
        "--config=configs/efficientdet_d0.py",
        f"--input={path}",
        f"--output={out}",
        "--reference=efficientdet_d0",
        "--image_size=128",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.load(open(out / "conversion.json"))
    options = info["model_options"]
    assert options["conv_padding"] == "symmetric" and options["backbone.bn_epsilon"] == 1e-5
    assert options["decoder.conv_bias"] is False and options["head.conv_bias"] is False
    diffs = info["parity"]["max_abs_diff"]
    assert max(diffs.values()) <= TOLERANCE, diffs
    print(f"\nconvert effdet efficientdet_d0 (PyTorch-trained family) @128: max abs diff {diffs}")


def test_converted_checkpoint_evaluates_and_finetunes_through_main(small_effdet, tmp_path):
    converted = tmp_path / "converted"
    assert (
        _convert(
            "--from=effdet",
            "--config=configs/efficientdet_quickstart.py",
            f"--input={small_effdet}",
            f"--output={converted}",
        ).returncode
        == 0
    )
    tiny = [
        "--config=configs/efficientdet_quickstart.py",
        f"--config.init_from={converted}",
        "--config.data.synthetic_train_images=8",
        "--config.data.synthetic_val_images=4",
        "--config.data.train_batch_size=4",
        "--config.data.eval_batch_size=4",
    ]
    result = _main(*tiny, f"--workdir={tmp_path / 'eval'}", "--mode=eval")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "COCO AP@[.5:.95]" in result.stdout
    assert isinstance(json.load(open(tmp_path / "eval" / "detections_0.json")), list)

    result = _main(*tiny, f"--workdir={tmp_path / 'finetune'}", "--config.total_steps=2", "--mode=train")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Initialised" in result.stderr and os.path.isdir(tmp_path / "finetune" / "checkpoints" / "2")


def test_timm_efficientnet_backbone_parity(tmp_path):
    for name, config in (("tf_efficientnet_b0", "efficientdet_d0"), ("tf_efficientnet_b3", "efficientdet_d3")):
        model = timm.create_model(name, pretrained=False)
        randomize_(model, np.random.RandomState(0).normal(size=(4, 128, 128, 3)).astype(np.float32))
        from safetensors.torch import save_file

        path = tmp_path / f"{name}.safetensors"
        save_file(model.state_dict(), str(path))
        out = tmp_path / name
        result = _convert(
            "--from=timm-efficientnet",
            f"--config=configs/{config}.py",
            f"--input={path}",
            f"--output={out}",
            f"--reference={name}",
            "--image_size=128",
        )
        assert result.returncode == 0, result.stderr[-3000:]
        info = json.load(open(out / "conversion.json"))
        assert "ImageNet classifier head (not part of the detection backbone)" in {r for _, r in info["ignored"]}
        assert info["parity"]["max_abs_diff"]["features"] <= TOLERANCE, info["parity"]
        print(f"\nconvert timm {name} @128: features max abs diff {info['parity']['max_abs_diff']['features']:.1e}")


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch hostile_marker",))


def test_hostile_pickle_is_refused_and_nothing_runs(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _RunsCode()}, path)
    result = _convert(
        "--from=effdet", "--config=configs/efficientdet_d0.py", f"--input={path}", f"--output={tmp_path / 'out'}"
    )
    _one_error_line(result, "would run code")
    assert not os.path.exists(os.path.join(ROOT, "hostile_marker"))
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("kind", ["truncated", "text"])
def test_unreadable_files_get_one_clear_line(small_effdet, tmp_path, kind):
    path = tmp_path / "bad.pth"
    data = open(small_effdet, "rb").read()
    path.write_bytes(data[: len(data) // 2] if kind == "truncated" else b"this is not a checkpoint\n")
    result = _convert(
        "--from=effdet", "--config=configs/efficientdet_quickstart.py", f"--input={path}", f"--output={tmp_path / 'o'}"
    )
    _one_error_line(result, "cannot read")
    assert not os.path.exists(tmp_path / "o")


def test_wrong_config_lists_every_mismatch_and_writes_nothing(small_effdet, tmp_path):
    result = _convert(
        "--from=effdet", "--config=configs/efficientdet_d1.py", f"--input={small_effdet}", f"--output={tmp_path / 'o'}"
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "mis-shaped" in result.stderr and "missing" in result.stderr
    assert not os.path.exists(tmp_path / "o") and not [p for p in os.listdir(tmp_path) if "partial" in p]


def test_containers_and_prefixes():
    tensors = {"a.weight": torch.ones(2, 3), "b.running_mean": torch.zeros(4)}
    for container in (
        tensors,
        {"state_dict": tensors, "meta": {"x": 1}},
        {"model": {f"module.{k}": v for k, v in tensors.items()}, "iteration": 5},
    ):
        state, _ = checkpoint.unwrap(container)
        assert sorted(state) == ["a.weight", "b.running_mean"]
        assert state["a.weight"].shape == (2, 3)
    with pytest.raises(UserError, match="no tensors"):
        checkpoint.unwrap({"meta": {"epoch": 1}})
