"""Bad configs and faults around the trainer (issue 16: items 5, 6, 11, 12, 13, 15): each is refused
or survived with one line, and nothing non-finite or damaged is trained on, checkpointed or lost."""

import errno
import glob
import logging
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from configs_util import CONFIG_DIR, load_config

from scaledet_jax import cli, train
from scaledet_jax.cli import UserError

ROOT = str(CONFIG_DIR.parent)


def tiny_config(**overrides):
    """The quickstart recipe on 8 synthetic images, batch 2, a checkpoint every step."""
    config = load_config("quickstart")
    config.data.synthetic_train_images = 8
    config.data.synthetic_val_images = 4
    config.data.train_batch_size = config.data.eval_batch_size = 2
    config.total_steps = 3
    config.log_every_steps = config.checkpoint_every_steps = 1
    config.keep_checkpoints = 5
    for key, value in overrides.items():
        node = config
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    return config


# ---------------------------------------------------------------------------------------------
# Item 11 (and 5): numbers checked up front, one line each
# ---------------------------------------------------------------------------------------------

BAD_NUMBERS = [
    ("data.train_batch_size", 0, "data.train_batch_size must be an integer >= 1, got 0"),
    ("data.eval_batch_size", -2, "data.eval_batch_size must be an integer >= 1, got -2"),
    ("total_steps", -1, "total_steps must be an integer >= 0 (0 = train num_epochs epochs), got -1"),
    ("num_epochs", 0, "num_epochs must be > 0 (or set total_steps >= 1), got 0"),
    ("stop_after_steps", -3, "stop_after_steps must be an integer >= 0 (0 = off), got -3"),
    ("log_every_steps", 0, "log_every_steps must be an integer >= 1, got 0"),
    ("checkpoint_every_steps", 0, "checkpoint_every_steps must be an integer >= 1, got 0"),
    ("eval_every_steps", -1, "eval_every_steps must be an integer >= 0 (0 = evaluate only at the end), got -1"),
    ("keep_checkpoints", 0, "keep_checkpoints must be an integer >= 1 (how many of the newest checkpoints are kept)"),
    ("keep_checkpoints", -1, "keep_checkpoints must be an integer >= 1"),
    ("optim.base_learning_rate", float("inf"), "optim.base_learning_rate must be a finite number >= 0, got inf"),
    ("optim.warmup_steps", -5, "optim.warmup_steps must be an integer >= 0, got -5"),
    ("optim.decay_epochs", (10, -1), "optim.decay_epochs must be a tuple of epochs >= 0"),
    ("optim.ema_decay", 1.0, "optim.ema_decay must be in [0, 1) (0 = off), got 1.0"),
    ("data.max_instances", 0, "data.max_instances must be an integer >= 1, got 0"),
    ("optim.frozen", ("^backbone/[",), "optim.frozen has '^backbone/[', not a regular expression"),
    ("optim.frozen_batch_stats", ("stem_(bn",), "optim.frozen_batch_stats has 'stem_(bn', not a regular expression"),
]


@pytest.mark.parametrize("key,value,message", BAD_NUMBERS, ids=[f"{k}={v}" for k, v, _ in BAD_NUMBERS])
def test_bad_numbers_are_refused_with_one_line(key, value, message):
    config = tiny_config(total_steps=0) if key == "num_epochs" else tiny_config()
    node = config
    *path, last = key.split(".")
    for part in path:
        node = node[part]
    node[last] = value
    with pytest.raises(UserError) as info:
        train.check_config(config)
    assert str(info.value).startswith(message), str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIG_DIR.glob("*.py")))
def test_every_shipped_config_passes_the_checks(name):
    train.check_config(load_config(name))


def test_total_steps_0_means_num_epochs_and_eval_every_0_is_off():
    train.check_config(tiny_config(total_steps=0, eval_every_steps=0))


def test_keep_checkpoints_0_is_refused_before_anything_is_written(tmp_path):
    # keep_checkpoints=0 used to delete every checkpoint, the final one included, and exit 0.
    with pytest.raises(UserError, match=r"^keep_checkpoints must be an integer >= 1"):
        train.train_and_evaluate(tiny_config(keep_checkpoints=0), str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")


@pytest.fixture(scope="module")
def synthetic_folder(tmp_path_factory):
    """A prepared synthetic COCO folder (8 train / 4 val images) the tests below share."""
    workdir = tmp_path_factory.mktemp("synthetic")
    from scaledet_jax.data import pipeline

    pipeline.get_builder(tiny_config(), str(workdir))
    return str(workdir / "synthetic_data")


def test_missing_eval_split_is_refused_before_training(tmp_path, synthetic_folder):
    config = tiny_config(**{"data.coco_folder": synthetic_folder, "data.eval_split": "validation"})
    with pytest.raises(UserError) as info:
        train.train_and_evaluate(config, str(tmp_path))
    assert str(info.value) == (
        f"data.eval_split='validation' is not a split of {synthetic_folder} (it has train, val): set "
        "--config.data.eval_split=val, or train without evaluation (--mode=train)"
    )
    assert not os.path.exists(tmp_path / "checkpoints")  # refused before the checkpoint manager, let alone a step
    train.Run(config, str(tmp_path / "train_only"))  # training alone does not need it


def test_eval_of_a_workdir_without_checkpoints_is_refused_without_creating_it(tmp_path):
    with pytest.raises(UserError, match=r"^no checkpoint in .*/nothing/checkpoints; train first"):
        train.evaluate(tiny_config(), str(tmp_path / "nothing"))
    assert not os.path.exists(tmp_path / "nothing")


def test_missing_train_split_is_refused(tmp_path, synthetic_folder):
    config = tiny_config(**{"data.coco_folder": synthetic_folder, "data.train_split": "training"})
    with pytest.raises(
        UserError, match=r"^data.train_split='training' is not a split of .* set --config.data.train_split=train$"
    ):
        train.Run(config, str(tmp_path))


# ---------------------------------------------------------------------------------------------
# Item 12: list fields are tuples, overridable from the command line
# ---------------------------------------------------------------------------------------------


def _lists(node, prefix=""):
    for key, value in node.items():
        if hasattr(value, "items"):
            yield from _lists(value, f"{prefix}{key}.")
        elif isinstance(value, list):
            yield f"{prefix}{key}"


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIG_DIR.glob("*.py")))
def test_no_config_field_is_a_list(name):
    # ml_collections refuses --config.x=... for list fields: the README says any field can be overridden.
    assert list(_lists(load_config(name))) == []


def test_tuple_fields_override_from_the_command_line():
    argv = [
        "main.py",
        f"--config={CONFIG_DIR / 'quickstart.py'}",
        "--config.optim.decay_epochs=(10,20)",
        "--config.model.anchor.aspect_ratios=(1.0,2.0)",
        "--config.optim.schedule=stepwise",
    ]
    values = flags.FlagValues()  # a private flag registry: absl's global one belongs to main.py
    cli.define_config_flag(flag_values=values, sys_argv=argv)
    cli._parse_flags(argv, values)
    config = cli.config_from_flags(flag_values=values)
    assert config.optim.decay_epochs == (10, 20) and config.model.anchor.aspect_ratios == (1.0, 2.0)
    train.check_config(config)
    # ... and the code reading them takes tuples: 2 aspect ratios x 3 scales per location, decay at epoch 10.
    per_location = train.model_anchors(config).shape[0] / sum((128 // 2**level) ** 2 for level in (3, 4, 5))
    assert per_location == 6
    schedule = train.learning_rate_schedule(config, 10, 300)
    base = config.optim.base_learning_rate * config.data.train_batch_size / 256
    np.testing.assert_allclose([float(schedule(99)), float(schedule(150))], [base, base * 0.1], rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Items 6 and 13: a workdir with checkpoints 1 and 2 (fresh states saved by a tiny run)
# ---------------------------------------------------------------------------------------------


def _plausible_state(abstract, seed=0):
    """A TrainState of ``abstract``'s structure without compiling the model's init: small random
    weights, unit BN variances, zero optimizer moments (as after init)."""
    rng = np.random.RandomState(seed)

    def leaf(path, x):
        name = "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
        if not jnp.issubdtype(x.dtype, jnp.floating) or name.startswith("opt_state"):
            return jnp.zeros(x.shape, x.dtype)
        if name.endswith(("/var", "/scale")):
            return jnp.ones(x.shape, x.dtype)
        return jnp.asarray(0.05 * rng.standard_normal(x.shape), x.dtype)

    state = jax.tree_util.tree_map_with_path(leaf, abstract)
    return state.replace(first_nonfinite_step=jnp.array(-1, jnp.int32))


@pytest.fixture(scope="module")
def seeded_run(tmp_path_factory, synthetic_folder):
    """A workdir whose checkpoints 1 and 2 are orbax checkpoints written by Run.save."""
    workdir = tmp_path_factory.mktemp("seeded")
    run = train.Run(tiny_config(**{"data.coco_folder": synthetic_folder}), str(workdir))
    for step in (1, 2):
        state = _plausible_state(run.abstract_state(), seed=step)
        run.save(state.replace(step=jnp.array(step, jnp.int32)))
    run.checkpoints.wait_until_finished()
    return str(workdir / "checkpoints")


def _copy_run(seeded_run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(seeded_run, workdir / "checkpoints")
    return str(workdir), str(workdir / "checkpoints")


def _all_finite_on_host(tree):
    return all(bool(np.all(np.isfinite(x))) for x in jax.tree_util.tree_leaves(jax.device_get(tree)))


def test_all_finite_sees_nan_and_inf_and_ignores_integers():
    assert bool(train.all_finite({"a": jnp.ones(3), "n": jnp.array([1, 2])}))
    assert not bool(train.all_finite({"a": jnp.ones(3), "b": jnp.array([1.0, jnp.inf])}))
    assert not bool(train.all_finite([jnp.array(jnp.nan)]))


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # the lr, on purpose
def test_update_that_makes_parameters_infinite_is_never_checkpointed(tmp_path, synthetic_folder, seeded_run):
    # Adam at lr 1e41 (8e38 at batch 2: inf in float32) from checkpoint 2: step 3's loss is finite but
    # its update makes the parameters Inf/NaN. That state used to be checkpointed and resumed from forever.
    workdir, checkpoints = _copy_run(seeded_run, tmp_path)
    config = tiny_config(**{"data.coco_folder": synthetic_folder, "total_steps": 5})
    config.optim.update(optimizer="adam", schedule="cosine", warmup_steps=0, base_learning_rate=1e41)
    with pytest.raises(FloatingPointError) as info:
        train.train_and_evaluate(config, workdir, evaluate=False)
    message = str(info.value)
    assert message.startswith("parameters became NaN or Inf at step 3; its update (learning rate inf"), message
    assert "although the loss" in message and f"the newest is step 2 in {checkpoints}" in message
    assert sorted(os.listdir(checkpoints)) == ["1", "2"]
    run = train.Run(config, workdir)
    for step in (1, 2):
        assert _all_finite_on_host(run.checkpoints.restore(step))


# ---------------------------------------------------------------------------------------------
# Item 13: a damaged latest checkpoint
# ---------------------------------------------------------------------------------------------


def _data_files(step_dir):
    files = glob.glob(os.path.join(step_dir, "default", "**", "d", "*"), recursive=True)
    return sorted(files, key=os.path.getsize)


def _truncate(step_dir):
    path = _data_files(step_dir)[-1]
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _garbage(step_dir):
    rng = np.random.RandomState(0)
    for path in _data_files(step_dir):
        with open(path, "r+b") as f:
            f.write(rng.bytes(min(4096, os.path.getsize(path))))


def _delete_data_file(step_dir):
    os.remove(_data_files(step_dir)[-1])


def _delete_metadata(step_dir):
    os.remove(os.path.join(step_dir, "default", "_METADATA"))


def _empty(step_dir):
    shutil.rmtree(step_dir)
    os.mkdir(step_dir)


DAMAGES = {
    "truncated": _truncate,
    "garbage": _garbage,
    "deleted_file": _delete_data_file,
    "no_metadata": _delete_metadata,
    "empty_dir": _empty,
}


def _tree_listing(directory):
    return sorted(
        (os.path.relpath(os.path.join(root, f), directory), os.path.getsize(os.path.join(root, f)))
        for root, _, files in os.walk(directory)
        for f in files
    )


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_latest_checkpoint_resumes_from_newest_intact(damage, tmp_path, synthetic_folder, seeded_run, caplog):
    workdir, checkpoints = _copy_run(seeded_run, tmp_path)
    DAMAGES[damage](os.path.join(checkpoints, "2"))
    damaged_files = _tree_listing(os.path.join(checkpoints, "2"))
    run = train.Run(tiny_config(**{"data.coco_folder": synthetic_folder}), workdir)
    with caplog.at_level(logging.INFO):
        state = run.restore_or_init()
    assert int(state.step) == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 2, warnings  # no orbax/TensorStore error dump, just these two lines
    assert warnings[0].startswith(f"checkpoint 2 in {checkpoints} is damaged (") and len(warnings[0]) < 400
    assert warnings[1] == (
        f"Resuming from checkpoint 1 in {checkpoints}, the newest intact one; moved the damaged one(s) aside: "
        f"{checkpoints}/2.damaged"
    )
    # Nothing deleted: the damaged step is kept as it was, under a name orbax ignores.
    assert sorted(os.listdir(checkpoints)) == ["1", "2.damaged"]
    assert _tree_listing(os.path.join(checkpoints, "2.damaged")) == damaged_files
    assert run.checkpoints.all_steps() == [1]


def test_main_on_a_damaged_checkpoint_prints_one_line_not_megabytes(tmp_path, synthetic_folder, seeded_run):
    # A truncated data file used to print ~2 MB of TensorStore specs and asyncio tracebacks.
    workdir, checkpoints = _copy_run(seeded_run, tmp_path)
    _truncate(os.path.join(checkpoints, "2"))
    overrides = {
        "data.coco_folder": synthetic_folder,
        "data.synthetic_train_images": 8,
        "data.synthetic_val_images": 4,
        "data.train_batch_size": 2,
        "data.eval_batch_size": 2,
        "total_steps": 1,  # resumed at step 1: nothing left to train
        "keep_checkpoints": 5,
    }
    result = subprocess.run(
        [sys.executable, "main.py", "--config=configs/quickstart.py", f"--workdir={workdir}", "--mode=train"]
        + [f"--config.{k}={v}" for k, v in overrides.items()],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(result.stderr) < 5000, result.stderr[-3000:]
    damaged = [line for line in result.stderr.splitlines() if "is damaged" in line]
    assert len(damaged) == 1 and f"checkpoint 2 in {checkpoints} is damaged (OUT_OF_RANGE: " in damaged[0]
    assert f"Resuming from checkpoint 1 in {checkpoints}, the newest intact one" in result.stderr
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr
    assert sorted(os.listdir(checkpoints)) == ["1", "2.damaged"]


def test_no_intact_checkpoint_says_how_to_go_on_and_changes_nothing(tmp_path, synthetic_folder, seeded_run):
    workdir, checkpoints = _copy_run(seeded_run, tmp_path)
    _truncate(os.path.join(checkpoints, "2"))
    _empty(os.path.join(checkpoints, "1"))
    before = _tree_listing(checkpoints)
    run = train.Run(tiny_config(**{"data.coco_folder": synthetic_folder}), workdir)
    with pytest.raises(UserError) as info:
        run.restore_or_init()
    message = str(info.value)
    assert message.startswith(f"checkpoints 2, 1 in {checkpoints} are all damaged (")
    assert f"nothing was changed. To start again from step 0 move the folder aside (mv {checkpoints} " in message
    assert _tree_listing(checkpoints) == before


def test_checkpoint_of_another_config_is_not_called_damaged(tmp_path, synthetic_folder, seeded_run):
    workdir, checkpoints = _copy_run(seeded_run, tmp_path)
    before = _tree_listing(checkpoints)
    config = tiny_config(**{"data.coco_folder": synthetic_folder, "model.head.num_filters": 32})
    with pytest.raises(UserError) as info:
        train.Run(config, workdir).restore_or_init()
    assert str(info.value).startswith(f"checkpoint 2 in {checkpoints} does not fit this config (")
    assert "in the config" in str(info.value) and "in a new --workdir" in str(info.value)
    assert _tree_listing(checkpoints) == before


# ---------------------------------------------------------------------------------------------
# Item 15: run_app's one line per expected error; bugs keep their traceback
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def jax_raise_sites(monkeypatch):
    """cli.keep_jax_raise_sites() for one test, then JAX's filtering as it was."""
    before = jax.config.jax_traceback_filtering
    monkeypatch.delenv("JAX_TRACEBACK_FILTERING", raising=False)
    cli.keep_jax_raise_sites()
    yield
    jax.config.update("jax_traceback_filtering", before)


def _raised(fn):
    try:
        fn()
    except BaseException as e:  # noqa: BLE001 - the test inspects it
        return e
    raise AssertionError("did not raise")


def _jax_internal_value_error():
    jax.jit(lambda x: jnp.split(x, 2))(jnp.zeros(3))  # an unequal split: a ValueError raised inside jax


def _our_value_error_under_jit():
    from scaledet_jax import nn

    jax.jit(lambda x: nn.get_activation("gelu-ish")(x))(jnp.zeros(3))


def _tfds_value_error(synthetic_folder):
    import tensorflow_datasets as tfds

    prepared = glob.glob(os.path.join(synthetic_folder, "**", "coco_folder", "*", "dataset_info.json"), recursive=True)
    return tfds.builder_from_directory(os.path.dirname(prepared[0])).info.splits["valid"]


def test_describe_error_sorts_expected_errors_from_bugs(jax_raise_sites, synthetic_folder):
    from scaledet_jax.tasks import build_task

    def oom():
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9.00GiB.\nmore")

    config = load_config("quickstart")
    config.model.name = "yolo"
    oom_line = "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9.00GiB."
    smaller = "data.eval_batch_size, model.image_size"
    cases = [
        (UserError("data.x must be 1"), ("data.x must be 1", 2)),
        (
            FileNotFoundError(errno.ENOENT, "No such file or directory", "/no/such"),
            ("No such file or directory: '/no/such'", 2),
        ),
        (PermissionError(errno.EACCES, "Permission denied", "/ro/dir"), ("Permission denied: '/ro/dir'", 2)),
        (IsADirectoryError(errno.EISDIR, "Is a directory", "/data"), ("Is a directory: '/data'", 2)),
        (FloatingPointError("loss became NaN or Inf at step 3; ..."), ("loss became NaN or Inf at step 3; ...", 1)),
        (KeyboardInterrupt(), ("interrupted", 130)),
        (
            _raised(lambda: build_task(config)),
            ("unknown model.name 'yolo'; available: efficientdet, faster_rcnn, mask_rcnn, retinanet", 2),
        ),
        (_raised(_our_value_error_under_jit), ("unknown activation 'gelu-ish'; use 'relu' or 'swish'", 2)),
        (
            _raised(lambda: _tfds_value_error(synthetic_folder)),
            ("Unknown split 'valid'. Should be one of ['train', 'val'].", 2),
        ),
        (_raised(oom), (f"out of accelerator memory ({oom_line}): lower data.train_batch_size (or {smaller})", 1)),
        # Bugs: a ValueError raised inside JAX, and any other type.
        (_raised(_jax_internal_value_error), None),
        (TypeError("unsupported operand"), None),
        (RuntimeError("internal"), None),
    ]
    for error, expected in cases:
        assert cli.describe_error(error) == expected, (type(error), error)


def _run_app(body, tmp_path, **env):
    script = tmp_path / "app.py"
    script.write_text(
        f"from scaledet_jax.cli import UserError, run_app\ndef main(argv):\n    {body}\nrun_app(main, 'prog')\n"
    )
    return subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, cwd=ROOT, timeout=300,
        env={**os.environ, "PYTHONPATH": ROOT, **env},
    )  # fmt: skip


@pytest.mark.parametrize(
    "body,code,line",
    [
        ("raise UserError('keep_checkpoints must be >= 1')", 2, "prog: error: keep_checkpoints must be >= 1"),
        ("open('/no/such/file')", 2, "prog: error: No such file or directory: '/no/such/file'"),
        (
            "raise FloatingPointError('loss became NaN or Inf at step 3')",
            1,
            "prog: error: loss became NaN or Inf at step 3",
        ),
        ("raise KeyboardInterrupt", 130, "prog: interrupted"),
    ],
    ids=["user_error", "missing_file", "nan_guard", "ctrl_c"],
)
def test_run_app_ends_expected_errors_with_one_line(body, code, line, tmp_path):
    result = _run_app(body, tmp_path)
    assert result.returncode == code and result.stderr.strip() == line, result.stderr[-2000:]


def test_run_app_keeps_the_traceback_of_a_bug(tmp_path):
    result = _run_app("import jax, jax.numpy as jnp; jax.jit(lambda x: jnp.split(x, 2))(jnp.zeros(3))", tmp_path)
    assert result.returncode == 1 and "Traceback" in result.stderr and "ValueError" in result.stderr
    assert "jax/_src" in result.stderr  # the raise site inside JAX is shown, not filtered away
    result = _run_app("raise UserError('x')", tmp_path, SCALEDET_JAX_TRACEBACK="1")
    assert result.returncode == 1 and "Traceback" in result.stderr


def test_main_refuses_bad_numbers_with_one_line_and_takes_tuple_overrides(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "main.py",
            "--config=configs/quickstart.py",
            f"--workdir={tmp_path / 'run'}",
            "--config.optim.decay_epochs=(10,20)",
            "--config.model.anchor.aspect_ratios=(1.0,2.0)",
            "--config.keep_checkpoints=0",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "main.py: error: keep_checkpoints must be an integer >= 1 (how many of the newest checkpoints are kept), got 0"
    )
    assert "Traceback" not in result.stderr
    assert not os.path.exists(tmp_path / "run")
