"""guoruoqian/DetNet_pytorch checkpoints through the converter (``--from=detnet-pytorch`` and
``--from=detnet-pytorch-imagenet``), against the PyTorch rebuild of the seed (tests/detnet_reference.py).

The seed's detector (DetNet-59 FPN Faster R-CNN, 21 VOC classes, RoI size 14: its 51M-parameter first FC
included) is randomised as test_detnet.py does it (BN statistics calibrated, residual branches' last BN
scaled by 0.1 so the rebuild's own float32 rounding stays far below 1e-4; biases random) and saved as
``trainval_net.py`` saves it (``{'session', 'epoch', 'model', 'optimizer', 'pooling_mode', 'class_agnostic'}``),
once as a current PyTorch writes its state_dict and once without ``num_batches_tracked`` (the seed's PyTorch
0.3 checkpoints). Both go through the CLI (started at once with the ImageNet checkpoint and a tampered one).

Parity in float32 through the converted directory, one 120 x 120 image (not a multiple of 16: C4..C6 are 8 x 8,
so the RoI spatial scale of P4/P5 is 8 / 120, the seed's ``H_l / S``, not 1 / 16): C2..C6, P2..P6, the RPN's
folded objectness (and the foreground probability the seed's proposal layer ranks) and deltas per level, and
on fixed RoIs of every level (some crossing the image border) the box head's class logits and deltas, through
the seed's ``_PyramidRoI_Feat`` + RoIAlignAvg (the kernel port) and ``RCNN_top`` / ``RCNN_cls_score`` /
``RCNN_bbox_pred``. All within 1e-4 (measured values printed).
"""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from configs_util import CONFIG_DIR
from detnet_reference import DetNet59, DetNetFPN
from test_detnet import _randomize
from torch_reference import nhwc

from scaledet_jax.backbones.detnet import SEED_RPN_INFERENCE_PAIRS
from scaledet_jax.cli import UserError
from scaledet_jax.convert import checkpoint
from scaledet_jax.convert.__main__ import convert_checkpoint
from scaledet_jax.convert.detnet_pytorch import SEED_VOC_CLASSES
from scaledet_jax.data.voc_folder import VOC_CLASSES
from scaledet_jax.models import build_model
from scaledet_jax.models.faster_rcnn import FasterRCNN
from scaledet_jax.ops.roi_align import multilevel_roi_align
from scaledet_jax.tools import profile

ROOT = str(CONFIG_DIR.parent)
SIZE = 120  # C2 30, C3 15, C4..C6 8: the stride-16 maps' scale is 8 / 120
TOLERANCE = 1e-4
CONFIG = "from scaledet_jax import defaults\n\n\ndef get_config():\n    return defaults.detnet_fasterrcnn_config()\n"
SEED_ENTRIES = ("session", "epoch", "optimizer", "pooling_mode", "class_agnostic")
# RoIs (ymin, xmin, ymax, xmax) in input pixels: sqrt((w + 1)(h + 1)) picks levels 2, 2, 3, 3, 4, 4, 5, 5; some
# reach past the image (the seed's kernel reads 0 there and extrapolates in the last pixel's band).
ROIS = np.asarray(
    [[10.0, 12.5, 40.0, 50.0], [60.3, 70.1, 119.0, 119.0], [-5.0, 3.0, 130.0, 110.0], [20.0, 30.5, 160.0, 150.0],
     [-40.0, -60.0, 200.0, 180.0], [0.0, 0.0, 250.0, 240.0], [-150.0, -200.0, 330.0, 310.0],
     [-20.0, 10.0, 480.0, 500.0]],
    np.float32,
)  # fmt: skip


def _config_file(tmp) -> str:
    path = tmp / "detnet59_fasterrcnn.py"
    path.write_text(CONFIG)
    return str(path)


def _config():
    from scaledet_jax import defaults

    config = defaults.detnet_fasterrcnn_config()
    config.model.image_size = SIZE
    return config


def _seed_checkpoint(state: dict, path, step_counters: bool = True) -> None:
    """``trainval_net.py``'s ``save_checkpoint`` dict (the optimizer as a fresh SGD's state_dict)."""
    state = {k: v for k, v in state.items() if step_counters or not k.endswith("num_batches_tracked")}
    params = [torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9).state_dict()
    torch.save(
        {"session": 1, "epoch": 8, "model": state, "optimizer": optimizer, "pooling_mode": "align",
         "class_agnostic": False},
        path,
    )  # fmt: skip


def _run(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "scaledet_jax.convert", *args, f"--image_size={SIZE}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def _imagenet_twin(detector: DetNetFPN) -> DetNet59:
    """The seed's ImageNet DetNet-59 holding the detector's backbone (keys renamed: ``RCNN_layer0.{0,1}`` ->
    ``conv1`` / ``bn1``, ``RCNN_layer{l}.0.`` -> ``layer{l}.``; loaded strictly) and a random 1000-class ``fc``:
    randomising a second 59-layer net would double the fixture's cost for no extra coverage of the mapping."""
    imagenet = DetNet59(num_classes=1000)
    renames = {"RCNN_layer0.0.": "conv1.", "RCNN_layer0.1.": "bn1."}
    renames |= {f"RCNN_layer{i}.0.": f"layer{i}." for i in range(1, 6)}
    state = {}
    for key, value in detector.state_dict().items():
        prefix = next((p for p in renames if key.startswith(p)), None)
        if prefix:
            state[renames[prefix] + key[len(prefix) :]] = value
    state |= {k: v for k, v in imagenet.state_dict().items() if k.startswith("fc.")}
    imagenet.load_state_dict(state, strict=True)
    return imagenet.eval()


@pytest.fixture(scope="module")
def conversions(tmp_path_factory):
    """The seed's detector (with and without step counters), its ImageNet DetNet-59 and a tampered detector,
    converted by four CLI runs started at once."""
    tmp = tmp_path_factory.mktemp("detnet")
    calibration = np.random.RandomState(0).normal(0, 1, (1, SIZE, SIZE, 3)).astype(np.float32)
    torch.manual_seed(0)
    detector = _randomize(DetNetFPN(num_classes=21), calibration, seed=0)
    imagenet = _imagenet_twin(detector)
    state = detector.state_dict()
    _seed_checkpoint(state, tmp / "fpn_1_8_5010.pth")
    _seed_checkpoint(state, tmp / "old.pth", step_counters=False)
    torch.save(imagenet.state_dict(), tmp / "detnet59.pth")
    # One missing, one unexpected, one mis-shaped tensor; the 51M-parameter RCNN_top.0 swapped for a 2 x 2 RoI
    # one (the layout reads the RoI size from it) to keep this file small.
    tampered = dict(state, **{"RCNN_top.0.weight": torch.zeros(1024, 256, 2, 2)})
    del tampered["RCNN_smooth1.bias"]
    tampered["RCNN_smooth3.weight"] = torch.zeros(256, 256, 3, 3)
    tampered["RCNN_latlayer3.weight"] = torch.zeros(256, 1024, 1, 1)
    _seed_checkpoint(tampered, tmp / "tampered.pth")
    config = f"--config={_config_file(tmp)}"
    runs = {
        "new": ["--from=detnet-pytorch", f"--input={tmp / 'fpn_1_8_5010.pth'}", f"--output={tmp / 'new'}"],
        "old": ["--from=detnet-pytorch", f"--input={tmp / 'old.pth'}", f"--output={tmp / 'old'}"],
        "imagenet": ["--from=detnet-pytorch-imagenet", f"--input={tmp / 'detnet59.pth'}", f"--output={tmp / 'in'}"],
        "tampered": ["--from=detnet-pytorch", f"--input={tmp / 'tampered.pth'}", f"--output={tmp / 'refused'}"],
    }
    processes = {name: _run([*args, config]) for name, args in runs.items()}
    results = {name: (p.communicate(timeout=900), p.returncode) for name, p in processes.items()}
    return dict(tmp=tmp, detector=detector, imagenet=imagenet, state=state, results=results)


@pytest.fixture(scope="module")
def converted(conversions):
    """Our model and variables from the converted seed checkpoint (directory 'new')."""
    model, variables, kept = _load(conversions["tmp"] / "new")
    assert kept == 0, "every variable comes from the checkpoint"
    return model, variables


def _ok(conversions, name: str) -> dict:
    (stdout, stderr), code = conversions["results"][name]
    assert code == 0, stderr[-3000:]
    out = conversions["tmp"] / {"new": "new", "old": "old", "imagenet": "in"}[name]
    return json.load(open(out / "conversion.json"))


def _load(directory):
    """Our model of the converted directory at SIZE and its variables (parts not in the directory: zeros)."""
    config = _config()
    checkpoint.apply_model_options(config, str(directory))
    model = build_model(config.model)
    shapes = profile.abstract_variables(model, SIZE)
    zeros = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), dict(shapes))
    variables, _, kept = checkpoint.merge_into(zeros, checkpoint.load_converted(str(directory)))
    return model, variables, kept


def _forward(model: FasterRCNN, x, rois):
    features = model.backbone(x)
    pyramid = model.decoder(features)
    objectness, deltas = model.rpn(pyramid)
    logits, boxes = model.roi_outputs(pyramid, rois)
    return dict(features=features, pyramid=pyramid, objectness=objectness, deltas=deltas, logits=logits, boxes=boxes)


@pytest.fixture(scope="module")
def parity(conversions, converted):
    model, variables = converted
    images = np.random.RandomState(3).normal(0, 1, (1, SIZE, SIZE, 3)).astype(np.float32)
    forward = jax.jit(lambda v, x, r: model.apply(v, x, r, method=_forward))
    ours = jax.tree_util.tree_map(np.asarray, forward(variables, images, ROIS[None]))
    reference = conversions["detector"]
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    rois = torch.from_numpy(np.concatenate([np.zeros((len(ROIS), 1)), ROIS[:, [1, 0, 3, 2]]], 1).astype(np.float32))
    with torch.no_grad():
        c, p = reference.backbone_fpn(x)
        rpn = reference.rpn_head(p)
        cls_score, _, bbox_pred = reference.rcnn_head(p, rois, torch.tensor([[SIZE, SIZE, 1.0]]))
    return dict(
        ours=ours, c=c, p=p, rpn=rpn, cls_score=cls_score, bbox_pred=bbox_pred, forward=forward, images=images,
        converted=converted,
    )  # fmt: skip


def _max_diff(ours: dict, theirs: dict, what: str) -> float:
    worst = 0.0
    for key, ref in theirs.items():
        got = np.asarray(ours[key])
        assert got.shape == ref.shape, (what, key, got.shape, ref.shape)
        assert np.abs(ref).max() > 0.05, f"{what} {key} is near zero: the comparison would be blind"
        diff = float(np.abs(got.astype(np.float64) - ref).max())
        assert diff <= TOLERANCE, f"{what} {key}: max abs diff {diff:.2e} (max |ref| {np.abs(ref).max():.2f})"
        worst = max(worst, diff)
    print(f"{what}: max abs diff {worst:.1e}")
    return worst


def test_cli_converts_the_seed_checkpoint_with_and_without_step_counters(conversions):
    new, old = _ok(conversions, "new"), _ok(conversions, "old")
    state = conversions["state"]
    counters = {k for k in state if k.endswith("num_batches_tracked")}
    assert new["mapped"] == old["mapped"] == len(state) - len(counters)
    for info, ignored_counters in ((new, counters), (old, set())):
        ignored = dict(map(tuple, info["ignored"]))
        assert {k for k in ignored if k in SEED_ENTRIES} == set(SEED_ENTRIES)
        assert all(ignored[k] == "checkpoint entry beside 'model'" for k in SEED_ENTRIES)
        assert set(ignored) - set(SEED_ENTRIES) == ignored_counters
    a = checkpoint.load_converted(str(conversions["tmp"] / "new"))
    b = checkpoint.load_converted(str(conversions["tmp"] / "old"))
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, a, b))
    stdout = conversions["results"]["new"][0][0]
    assert "ignored     5  checkpoint entry beside 'model'" in stdout and "roi.style='jwyang_avg'" in stdout


def test_options_recorded_and_every_number_used(conversions, converted):
    info = _ok(conversions, "new")
    options = info["model_options"]
    expected = {
        "num_classes": 21, "background_slot": True, "category_ids": [], "min_level": 2, "max_level": 6,
        "feature_strides": [4, 8, 16, 16, 16], "backbone.norm": "frozen", "backbone.bn_epsilon": 1e-5,
        "backbone.frozen_stages": 2, "backbone.stage_blocks": [3, 4, 6, 3, 3],
        "backbone.stage_filters": [64, 128, 256, 256, 256], "backbone.stem_filters": 64,
        "decoder.upsample": "bilinear_align_corners", "decoder.output_levels": [2, 3],
        "decoder.top_down_input": "output", "decoder.backbone_max_level": 6, "decoder.num_filters": 256,
        "rpn.num_filters": 512, "anchor.aspect_ratios": [0.5, 1.0, 2.0], "anchor.anchor_size": 8.0,
        "anchor.center_offset": 0.0, "anchor.round_base": False, "roi.style": "jwyang_avg", "roi.output_size": 14,
        "roi.min_level": 2, "roi.max_level": 5, "box_head.num_fcs": 2, "box_head.fc_dims": 1024,
        "box_head.class_agnostic_boxes": False, "box_coder_weights": [10.0, 10.0, 5.0, 5.0],
        "input.mean": [123.675, 116.28, 103.53], "input.std": [58.395, 57.12, 57.375], "input.channels": "rgb",
        "conv_padding": "symmetric", "pool_padding": "symmetric",
    }  # fmt: skip
    assert {k: options[k] for k in expected} == expected
    assert SEED_VOC_CLASSES == VOC_CLASSES  # output c is VOC category id c: no category table needed
    # Every number of the checkpoint lands in our variables, except the RPN score's 6 -> 3 channel fold.
    ours = sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(converted[1]))
    theirs = sum(v.numel() for k, v in conversions["state"].items() if not k.endswith("num_batches_tracked"))
    assert ours == theirs - 3 * (512 + 1)
    print(f"DetNet-59 FPN Faster R-CNN (21 classes): {theirs:,} numbers in the checkpoint, {ours:,} converted")


def test_backbone_and_fpn_match_the_seed(parity):
    ours = parity["ours"]
    _max_diff(ours["features"], {k: nhwc(v) for k, v in parity["c"].items()}, "DetNet-59 C2..C6")
    _max_diff(ours["pyramid"], {k: nhwc(v) for k, v in parity["p"].items()}, "FPN P2..P6")


def test_rpn_matches_the_seed_folded(parity):
    ours, rpn = parity["ours"], parity["rpn"]
    theirs_objectness, theirs_deltas = {}, {}
    for level, score in rpn["raw_scores"].items():
        s = nhwc(score)
        theirs_objectness[level] = np.stack([s[..., p] - s[..., q] for p, q in SEED_RPN_INFERENCE_PAIRS], -1)
        d = nhwc(rpn["raw_deltas"][level])
        theirs_deltas[level] = d.reshape(d.shape[:-1] + (3, 4))[..., [1, 0, 3, 2]].reshape(d.shape)
    _max_diff(ours["objectness"], theirs_objectness, "RPN objectness (folded) P2..P6")
    _max_diff(ours["deltas"], theirs_deltas, "RPN deltas P2..P6")
    # What the seed's proposal layer ranks: sigmoid of our logit, in its (level, y, x, anchor) order.
    ranked = np.concatenate([ours["objectness"][level].reshape(1, -1) for level in range(2, 7)], 1)
    diff = float(np.abs(1 / (1 + np.exp(-ranked.astype(np.float64))) - rpn["fg_prob"].numpy()).max())
    print(f"ranked foreground probability: max abs diff {diff:.1e}")
    assert diff <= TOLERANCE


def test_box_head_on_fixed_rois_matches_the_seed(parity):
    ours = parity["ours"]
    from detnet_reference import roi_levels

    seed_rois = torch.from_numpy(np.concatenate([np.zeros((len(ROIS), 1)), ROIS[:, [1, 0, 3, 2]]], 1))
    assert sorted(roi_levels(seed_rois.float()).int().tolist()) == [2, 2, 3, 3, 4, 4, 5, 5]
    deltas = parity["bbox_pred"].numpy()
    theirs = {
        "logits": parity["cls_score"].numpy()[None],
        "boxes": deltas.reshape(-1, 21, 4)[..., [1, 0, 3, 2]].reshape(1, len(ROIS), -1),
    }
    _max_diff(ours, theirs, "box head class logits / deltas on fixed RoIs (RoIAlignAvg 14x14)")

    # Negative controls on the same pyramid: the seed's RoIAlignAvg at 1 / stride instead of H_l / S (only the
    # P4/P5 RoIs change: 30 / 120 and 15 / 120 are exactly 1 / 4 and 1 / 8), and torchvision's RoIAlign.
    model, variables = parity["converted"]
    pyramid = {k: np.asarray(v) for k in range(2, 6) for v in [parity["ours"]["pyramid"][k]]}
    strides = {2: 4, 3: 8, 4: 16, 5: 16}
    for name, style in (("1 / stride scale", "jwyang_avg"), ("torchvision RoIAlign", "torchvision")):
        pooled = multilevel_roi_align(pyramid, ROIS[None], 14, style=style, strides=strides)
        logits, _ = model.apply(variables, pooled, method=lambda m, x: m.box_head(x))
        wrong = np.abs(np.asarray(logits) - theirs["logits"]).max(-1)[0]
        print(f"{name}: class logits max abs diff per RoI {np.array2string(wrong, precision=1)}")
        assert wrong.max() > 10 * TOLERANCE
        if style == "jwyang_avg":
            assert wrong[:4].max() <= TOLERANCE


def test_imagenet_checkpoint_initialises_the_backbone(conversions, parity):
    info = _ok(conversions, "imagenet")
    assert info["scope"] == ["backbone"] and info["layout"] == "detnet-pytorch-imagenet"
    imagenet = conversions["imagenet"]
    ignored = dict(map(tuple, info["ignored"]))
    assert ignored["fc.weight"] == ignored["fc.bias"] == "ImageNet classifier (the detector's backbone has none)"
    assert info["mapped"] + len(ignored) == len(imagenet.state_dict())
    model, variables, kept = _load(conversions["tmp"] / "in")
    assert kept > 0  # the FPN and heads are not in an ImageNet checkpoint
    ours = parity["forward"](variables, parity["images"], ROIS[None])["features"]
    with torch.no_grad():
        theirs = imagenet.features(torch.from_numpy(parity["images"]).permute(0, 3, 1, 2))
    _max_diff(jax.tree_util.tree_map(np.asarray, ours), {k: nhwc(v) for k, v in theirs.items()}, "ImageNet C2..C6")


def test_bad_checkpoints_are_refused_and_nothing_is_written(conversions, tmp_path):
    (_, stderr), code = conversions["results"]["tampered"]
    assert code != 0 and "Traceback" not in stderr
    assert "1 missing" in stderr and "decoder/output_3/bias (expects RCNN_smooth1.bias)" in stderr
    assert "1 unexpected" in stderr and "RCNN_smooth3.weight" in stderr
    assert "1 mis-shaped" in stderr and "RCNN_latlayer3.weight: (1, 1, 1024, 256)" in stderr
    assert not (conversions["tmp"] / "refused").exists()
    assert not [p for p in conversions["tmp"].iterdir() if "partial" in p.name]
    # The two checkpoints given to each other's layout, and a config without DetNet: one line each, before mapping.
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, tmp_path / "imagenet.pth")
    torch.save({"model": {"RCNN_layer0.0.weight": torch.zeros(64, 3, 7, 7)}}, tmp_path / "detector.pth")
    config = _config()
    resnet = _config()
    resnet.model.backbone.name = "resnet"
    for layout, source, cfg, message in (
        ("detnet-pytorch", "imagenet.pth", config, "ImageNet DetNet-59 .* --from=detnet-pytorch-imagenet"),
        ("detnet-pytorch-imagenet", "detector.pth", config, "FPN detector .* --from=detnet-pytorch$"),
        ("detnet-pytorch", "detector.pth", resnet, "not a DetNet_pytorch FPN detector checkpoint: no RCNN_rpn"),
        ("detnet-pytorch-imagenet", "imagenet.pth", resnet, "a 'resnet' backbone; use a DetNet-59"),
    ):
        with pytest.raises(UserError, match=message) as error:
            convert_checkpoint(layout, cfg, "config.py", str(tmp_path / source), str(tmp_path / "out"))
        assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()
