"""The whole run: ``train_and_evaluate(config, workdir)`` and ``evaluate(config, workdir)``.

config -> data (tf.data on the host) -> model -> loss and train step (jit over a device mesh,
batch sharded on 'data', state replicated and donated) -> orbax checkpoints and clu metrics ->
COCO evaluation. The same code runs on one CPU, several devices and several hosts; batch norm
statistics are computed over the global batch (cross-replica BN) because the step is one jit
over globally sharded arrays.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import math
import os
import re
import sys
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from scaledet_jax import nn as snn
from scaledet_jax.cli import UserError
from scaledet_jax.tasks import Task, build_task
from scaledet_jax.tasks.retinanet import category_index_table, model_anchors  # noqa: F401 - public names kept here


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    ema_params: Any  # a copy of params when EMA is on, else None
    # -1, or the first step (numbered as in the log and the checkpoints: step N is the N-th update) whose
    # loss was NaN/Inf or whose update left NaN/Inf in the parameters, statistics or optimizer state.
    first_nonfinite_step: jax.Array


# ---------------------------------------------------------------------------------------------
# Set-up
# ---------------------------------------------------------------------------------------------


_CACHE_EVENTS = {"/jax/compilation_cache/cache_hits": 0, "/jax/compilation_cache/cache_misses": 0}


def _count_cache_event(event: str, **_) -> None:
    if event in _CACHE_EVENTS:
        _CACHE_EVENTS[event] += 1


def use_compilation_cache(path: str) -> None:
    """Turns on JAX's persistent compilation cache in ``path`` ('' = leave it off).

    JAX reads the setting when it first compiles, so this must run before anything is jitted in the
    process (``main.py`` does it first); hits are counted for the log.
    """
    if not path:
        return
    path = os.path.abspath(os.path.expanduser(path))
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        raise UserError(
            f"compilation_cache_dir {path!r} cannot be created ({error.strerror}); pick a writable directory"
        ) from None
    if not os.access(path, os.W_OK):
        raise UserError(f"compilation_cache_dir {path!r} is not writable; pick a writable directory")
    jax.config.update("jax_compilation_cache_dir", path)
    if not getattr(use_compilation_cache, "listening", False):
        jax.monitoring.register_event_listener(_count_cache_event)
        use_compilation_cache.listening = True


def compilation_cache_hits() -> int:
    """Executables loaded from the persistent compilation cache so far in this process."""
    return _CACHE_EVENTS["/jax/compilation_cache/cache_hits"]


def make_mesh() -> jax.sharding.Mesh:
    """All devices on one 'data' axis (Auto axis type: sharded BN steps need it in this JAX)."""
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def check_config(config: ml_collections.ConfigDict) -> None:
    """Refuses numbers that cannot work, before anything is built or written: one ``UserError`` line
    naming the key, the value and what is allowed. Checked here (and only here): the batch sizes
    (>= 1 and a multiple of the device count), ``total_steps`` (>= 1, or 0 = train ``num_epochs``
    epochs), ``num_epochs`` (> 0 when it counts), ``stop_after_steps`` (>= 0, 0 = off),
    ``log_every_steps`` and ``checkpoint_every_steps`` (>= 1), ``eval_every_steps`` (>= 0, 0 = evaluate
    only at the end), ``keep_checkpoints`` (>= 1), the learning rates (finite, >= 0), the warmup, decay,
    clipping and EMA settings, ``data.max_instances`` and ``data.shuffle_buffer`` (>= 1)."""
    d, o = config.data, config.optim

    def need(ok: bool, key: str, value: Any, what: str) -> None:
        if not ok:
            raise UserError(f"{key} must be {what}, got {value!r}")

    def integer(key: str, value: Any, minimum: int, what: str = "") -> None:
        need(_is_int(value) and value >= minimum, key, value, f"an integer >= {minimum}{what}")

    def number(key: str, value: Any, minimum: float, what: str = "") -> None:
        need(
            _is_number(value) and math.isfinite(value) and value >= minimum,
            key,
            value,
            f"a finite number >= {minimum}{what}",
        )

    integer("data.train_batch_size", d.train_batch_size, 1)
    integer("data.eval_batch_size", d.eval_batch_size, 1)
    devices = jax.device_count()
    for key, size in (("data.train_batch_size", d.train_batch_size), ("data.eval_batch_size", d.eval_batch_size)):
        if size % devices:
            raise UserError(
                f"{key} {size} must be a multiple of the {devices} devices (e.g. {max(size // devices, 1) * devices})"
            )
    integer("total_steps", config.total_steps, 0, " (0 = train num_epochs epochs)")
    if not config.total_steps:
        need(_is_number(config.num_epochs) and config.num_epochs > 0, "num_epochs", config.num_epochs,
             "> 0 (or set total_steps >= 1)")  # fmt: skip
    integer("stop_after_steps", config.stop_after_steps, 0, " (0 = off)")
    integer("log_every_steps", config.log_every_steps, 1)
    integer("checkpoint_every_steps", config.checkpoint_every_steps, 1)
    integer("eval_every_steps", config.eval_every_steps, 0, " (0 = evaluate only at the end)")
    integer("keep_checkpoints", config.keep_checkpoints, 1, " (how many of the newest checkpoints are kept)")
    integer("eval_pictures", config.get("eval_pictures", 0), 0, " (eval images drawn to TensorBoard; 0 = none)")
    number("optim.base_learning_rate", o.base_learning_rate, 0)
    number("optim.warmup_learning_rate", o.warmup_learning_rate, 0)
    integer("optim.warmup_steps", o.warmup_steps, 0)
    number("optim.decay_factor", o.decay_factor, 0)
    need(
        isinstance(o.decay_epochs, (tuple, list)) and all(_is_number(e) and e >= 0 for e in o.decay_epochs),
        "optim.decay_epochs",
        o.decay_epochs,
        "a tuple of epochs >= 0, e.g. --config.optim.decay_epochs='(16,22)'",
    )
    number("optim.gradient_clip_norm", o.gradient_clip_norm, 0, " (0 = off)")
    need(_is_number(o.ema_decay) and 0 <= o.ema_decay < 1, "optim.ema_decay", o.ema_decay, "in [0, 1) (0 = off)")
    for key in ("frozen", "frozen_batch_stats"):
        patterns = o.get(key, ())
        if isinstance(patterns, str):
            patterns = (patterns,)
        need(isinstance(patterns, (tuple, list)), f"optim.{key}", patterns, "a tuple of regular expressions")
        for pattern in patterns:
            try:
                re.compile(pattern)
            except (re.error, TypeError) as e:
                raise UserError(f"optim.{key} has {pattern!r}, not a regular expression ({e})") from None
    integer("data.max_instances", d.max_instances, 1)
    integer("data.shuffle_buffer", d.shuffle_buffer, 1)
    need(config.get("eval_protocol", "coco") in ("coco", "voc"), "eval_protocol", config.get("eval_protocol"),
         "'coco' or 'voc'")  # fmt: skip


def learning_rate_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
    """Linear warmup from ``warmup_learning_rate``, then stepwise or cosine decay (lr scaled by batch/256)."""
    o = config.optim
    base = o.base_learning_rate * config.data.train_batch_size / 256.0
    warmup = min(o.warmup_steps, max(total_steps - 1, 0))
    if o.schedule == "stepwise":
        boundaries = {int(e * steps_per_epoch): o.decay_factor for e in o.decay_epochs}
        decay = optax.piecewise_constant_schedule(base, {b - warmup: f for b, f in boundaries.items() if b > warmup})
    elif o.schedule == "cosine":
        decay = optax.cosine_decay_schedule(base, max(total_steps - warmup, 1))
    else:
        raise UserError(f"unknown optim.schedule {o.schedule!r}; use 'stepwise' or 'cosine'")
    if not warmup:
        return decay
    return optax.join_schedules([optax.linear_schedule(o.warmup_learning_rate, base, warmup), decay], [warmup])


def make_optimizer(config: ml_collections.ConfigDict, schedule: optax.Schedule) -> optax.GradientTransformation:
    o = config.optim
    optimizers = {
        "sgd": lambda: optax.sgd(schedule, momentum=o.momentum),
        # Adam (weight decay stays in the loss as TF's L2): converges faster from scratch on small data.
        "adam": lambda: optax.adam(schedule),
    }
    if o.optimizer not in optimizers:
        raise UserError(f"unknown optim.optimizer {o.optimizer!r}; use one of {', '.join(optimizers)}")
    parts = []
    if o.gradient_clip_norm:
        parts.append(optax.clip_by_global_norm(o.gradient_clip_norm))
    parts.append(optimizers[o.optimizer]())
    tx = optax.chain(*parts)
    frozen = tuple(o.get("frozen", ()))
    if frozen:  # frozen parameters get no update (and no optimizer state)
        tx = optax.multi_transform(
            {"train": tx, "frozen": optax.set_to_zero()},
            lambda params: jax.tree_util.tree_map_with_path(
                lambda path, _: "frozen" if is_frozen(path, frozen) else "train", params
            ),
        )
    return tx


def param_path(path) -> str:
    """'backbone/stem_conv/kernel' for a pytree key path."""
    return "/".join(str(getattr(k, "key", k)) for k in path)


def is_frozen(path, patterns) -> bool:
    """Whether a parameter matches one of ``optim.frozen``'s regular expressions (searched in its path)."""
    name = param_path(path)
    return any(re.search(p, name) for p in patterns)


def l2_penalty(params: Any, weight_decay: float, frozen: tuple[str, ...] = ()) -> jax.Array:
    """TF's kernel regularizer: l2(wd / 2) on every conv/dense kernel (not on BN, biases or frozen weights)."""
    flat = flax.traverse_util.flatten_dict(params)
    return (
        0.5
        * weight_decay
        * sum(jnp.sum(jnp.square(v)) for k, v in flat.items() if k[-1] == "kernel" and not is_frozen(k, frozen))
    )


def init_state(config, task: Task, tx, rng) -> TrainState:
    variables = task.init({"params": rng, "dropout": rng}, config.model.image_size)
    params = variables["params"]
    return TrainState(
        step=jnp.array(0, jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        ema_params=jax.tree_util.tree_map(jnp.copy, params) if config.optim.ema_decay else None,
        first_nonfinite_step=jnp.array(-1, jnp.int32),
    )


# ---------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------


def compute_losses(config, task: Task, params, batch_stats, batch, rng, train: bool = True):
    """The task's losses of a global batch plus the L2 penalty; returns (total, (parts, new batch_stats)).
    Batch norms matching ``optim.frozen_batch_stats`` use (and keep) their running statistics in training."""
    with snn.frozen_statistics(config.optim.get("frozen_batch_stats", ())):
        parts, new_stats = task.losses({"params": params, "batch_stats": batch_stats}, batch, rng, train)
    parts = dict(parts)
    parts["l2_loss"] = l2_penalty(params, config.loss.l2_weight_decay, tuple(config.optim.get("frozen", ())))
    parts["total_loss"] = parts["model_loss"] + parts["l2_loss"]
    return parts["total_loss"], (parts, new_stats)


def all_finite(tree: Any) -> jax.Array:
    """Whether every floating-point value in ``tree`` is finite (one reduction per array; in a jitted
    step XLA fuses them, a small cost next to the forward and backward pass)."""
    checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(checks)) if checks else jnp.array(True)


def train_step(config, task: Task, tx, schedule, base_rng, state: TrainState, batch):
    rng = jax.random.fold_in(base_rng, state.step)
    grad_fn = jax.value_and_grad(lambda p: compute_losses(config, task, p, state.batch_stats, batch, rng), has_aux=True)
    (_, (parts, new_stats)), grads = grad_fn(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema_params
    if ema is not None:
        decay = jnp.minimum(config.optim.ema_decay, (1.0 + state.step) / (10.0 + state.step))
        ema = jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)
    # The NaN guard: this step (numbered state.step + 1, as its checkpoint) is bad when its loss is not
    # finite, or when the update it made left NaN/Inf in the state (e.g. an infinite learning rate with
    # a finite loss); the state is then never checkpointed (_raise_if_nonfinite).
    finite = jnp.isfinite(parts["total_loss"]) & all_finite((params, new_stats, opt_state, ema))
    bad = jnp.where((state.first_nonfinite_step < 0) & ~finite, state.step + 1, state.first_nonfinite_step)
    metrics = dict(parts, learning_rate=schedule(state.step), grad_norm=optax.global_norm(grads))
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        batch_stats=new_stats,
        opt_state=opt_state,
        ema_params=ema,
        first_nonfinite_step=bad,
    )
    return new_state, metrics


# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------


class Run:
    """What train and eval share: mesh, model, data, optimizer, checkpoints."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, *, needs_eval: bool = False):
        """``needs_eval``: the run will evaluate, so the eval split must exist (checked now, before training)."""
        from scaledet_jax import distributed
        from scaledet_jax.data import pipeline

        check_config(config)
        self.config, self.workdir = config, os.path.abspath(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self.mesh = make_mesh()
        self.replicated = NamedSharding(self.mesh, P())
        self.data_sharding = NamedSharding(self.mesh, P("data"))
        self.task = build_task(config)
        self.model = self.task.model
        self._predict = None  # the jitted predict function, compiled once per run
        self.pictures: list[np.ndarray] = []
        self._ground_truth: dict | None = None  # a tfds eval split's objects, read once per run
        # Process 0 generates/prepares the data first; the others then find it (or make their own copy).
        self.builder = distributed.main_process_first(
            "data prepared", lambda: pipeline.get_builder(config, self.workdir)
        )
        num_train = self.split_size("data.train_split")
        if num_train is None:  # a dataset without split sizes (tfds mock data): total_steps says how long
            if not config.total_steps:
                raise UserError(f"the size of split {config.data.train_split!r} is unknown; set total_steps")
            num_train = config.total_steps * config.data.train_batch_size
        if needs_eval:
            self.split_size("data.eval_split")
        self.steps_per_epoch = max(num_train // config.data.train_batch_size, 1)
        self.total_steps = config.total_steps or int(math.ceil(config.num_epochs * self.steps_per_epoch))
        self.schedule = learning_rate_schedule(config, self.steps_per_epoch, self.total_steps)
        self.tx = make_optimizer(config, self.schedule)
        self.checkpoints = _checkpoint_manager(os.path.join(self.workdir, "checkpoints"), config)

    def split_size(self, key: str) -> int | None:
        """Examples in the split named by config ``key`` ('data.train_split'); a one-line UserError when
        the dataset has no such split; None when the dataset does not list its splits."""
        split = self.config.data[key.split(".")[-1]]
        splits = self.builder.info.splits
        try:
            return splits[split].num_examples
        except (KeyError, ValueError):  # tfds: ValueError 'Unknown split' or a malformed split string
            names = sorted(splits.keys())
            if not names:
                return None
            d = self.config.data
            where = f"tfds {d.tfds_name}" if d.source == "tfds" else (d.coco_folder or f"{self.workdir}/synthetic_data")
            other = d.train_split if key == "data.eval_split" else d.eval_split
            suggestion = ([n for n in names if n != other] or names)[0]
            hint = ", or train without evaluation (--mode=train)" if key == "data.eval_split" else ""
            raise UserError(
                f"{key}={split!r} is not a split of {where} (it has {', '.join(names)}): set "
                f"--config.{key}={suggestion}{hint}"
            ) from None

    def abstract_state(self) -> TrainState:
        shapes = jax.eval_shape(lambda: init_state(self.config, self.task, self.tx, jax.random.key(0)))
        return jax.tree_util.tree_map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self.replicated), shapes
        )

    def restore_or_init(self) -> TrainState:
        """The newest intact checkpoint (``restore_newest_intact``), else a fresh state (or ``init_from``)."""
        state = self.restore_newest_intact()
        if state is not None:
            return state
        init = jax.jit(lambda rng: init_state(self.config, self.task, self.tx, rng), out_shardings=self.replicated)
        state = init(jax.random.key(self.config.seed))
        if self.config.init_from:
            state = self._load_converted(state)
        return state

    def restore_newest_intact(self) -> TrainState | None:
        """The newest checkpoint that restores, or None when there is none.

        A checkpoint that does not restore although its tensor list fits the config (truncated,
        garbage or deleted data files, missing metadata, an empty step folder) is damaged: one warning
        line says so, and once an older one restores, the damaged newer ones are moved aside to
        ``N.damaged`` (never deleted) so that training can write step N again. When none is intact,
        nothing is moved and a UserError says how to go on. A checkpoint written by a different
        model/optimizer config, an unreadable one and out-of-memory are not damage: they are raised.
        """
        import orbax.checkpoint as ocp

        directory = str(self.checkpoints.directory)
        steps = sorted(self.checkpoints.all_steps(), reverse=True)
        if not steps:
            return None
        abstract = self.abstract_state()
        probing = os.path.join(directory, "")
        _RESTORE_NOISE.install()
        _RESTORE_NOISE.folders.add(probing)
        damaged: list[tuple[int, str]] = []
        failed = False
        try:
            for step in steps:
                try:
                    with _quiet_orbax_logs():
                        state = self.checkpoints.restore(step, args=ocp.args.StandardRestore(abstract))
                except Exception as error:  # noqa: BLE001 - damage is told apart from the rest, which is re-raised
                    failed = True
                    self._raise_unless_damaged(step, abstract, error)
                    reason = _short_reason(error)
                    logging.warning("checkpoint %d in %s is damaged (%s)", step, directory, reason)
                    damaged.append((step, reason))
                    _RESTORE_NOISE.folders.add(os.path.join(directory, str(step), ""))
                    # A failed restore can leave the manager confused (an empty step folder makes it
                    # expect several items): the next step gets a fresh one.
                    self.checkpoints.close()
                    self.checkpoints = _checkpoint_manager(directory, self.config)
                    continue
                if damaged:
                    moved = self._set_aside([s for s, _ in damaged])
                    logging.warning(
                        "Resuming from checkpoint %d in %s, the newest intact one; moved the damaged one(s) aside: %s",
                        step,
                        directory,
                        ", ".join(moved),
                    )
                else:
                    logging.info("Resuming from checkpoint at step %d in %s", step, directory)
                return state
            listed = ", ".join(str(s) for s, _ in damaged)
            raise UserError(
                f"checkpoint{'s' * (len(damaged) > 1)} {listed} in {directory} "
                f"{'are all' if len(damaged) > 1 else 'is'} damaged ({damaged[0][1]}) and no intact one is left; "
                f"nothing was changed. To start again from step 0 move the folder aside (mv {directory} "
                f"{directory}.damaged) or use a new --workdir; or put back a copy of it from a backup"
            )
        finally:
            if failed:
                gc.collect()  # a failed restore's leftovers report now, while the probed folder is dropped
            _RESTORE_NOISE.folders.discard(probing)

    def _raise_unless_damaged(self, step: int, abstract: TrainState, error: Exception) -> None:
        """Re-raises what a restore failure is when it is not damage (see ``restore_newest_intact``)."""
        if isinstance(error, MemoryError) or "RESOURCE_EXHAUSTED" in str(error):
            raise error
        directory = str(self.checkpoints.directory)
        step_dir = os.path.join(directory, str(step))
        for root, dirs, files in os.walk(step_dir):
            for name in [*dirs, *files]:
                path = os.path.join(root, name)
                if not os.access(path, os.R_OK):
                    raise UserError(
                        f"cannot read checkpoint {step} in {directory}: permission denied on {path}"
                    ) from None
        found = _checkpoint_shapes(os.path.join(step_dir, "default"))
        if found is None:  # its metadata does not read: damaged
            return
        difference = _tree_difference(_tree_shapes(abstract), found)
        if difference:
            raise UserError(
                f"checkpoint {step} in {directory} does not fit this config ({difference}): it was written by a "
                "different model or optimizer config; resume with that config, or train this one in a new --workdir"
            ) from None

    def _set_aside(self, steps: list[int]) -> list[str]:
        """Renames each step folder to N.damaged (N.damaged.2, ... if taken); returns the new paths."""
        directory = str(self.checkpoints.directory)
        moved = []
        for step in steps:
            source = os.path.join(directory, str(step))
            target, n = f"{source}.damaged", 1
            while os.path.exists(target):
                n += 1
                target = f"{source}.damaged.{n}"
            if jax.process_index() == 0:
                os.rename(source, target)
            moved.append(target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("scaledet_jax: damaged checkpoints set aside")
        self.checkpoints.close()
        self.checkpoints = _checkpoint_manager(directory, self.config)
        return moved

    def _load_converted(self, state: TrainState) -> TrainState:
        """``init_from``'s weights (a converted directory, or another run's newest checkpoint) over the fresh
        state; with a different class count the class-dependent predictor tensors keep their fresh init."""
        from scaledet_jax.convert import checkpoint

        source = self.config.init_from
        loaded = init_from_variables(source)
        source_classes = init_from_num_classes(source)
        other_classes = source_classes is not None and source_classes != self.config.model.num_classes
        reinitialised: list[str] | None = [] if other_classes else None
        params, n_params, fresh = checkpoint.merge_into(
            jax.device_get(state.params), loaded.get("params", {}), "params", reinitialised
        )
        stats, n_stats, _ = checkpoint.merge_into(
            jax.device_get(state.batch_stats), loaded.get("batch_stats", {}), "batch_stats", reinitialised
        )
        logging.info(
            "Initialised %d parameter and %d statistics tensors from %s; %d parameter tensors keep their random init",
            n_params,
            n_stats,
            source,
            fresh,
        )
        if reinitialised:
            logging.warning(
                "init_from %s has %d classes, the config %d: the dataset's classes are kept and %d class-dependent "
                "tensors are re-initialised (%s)",
                source,
                source_classes,
                self.config.model.num_classes,
                len(reinitialised),
                ", ".join(name.removeprefix("params/") for name in reinitialised),
            )
        params = jax.device_put(params, self.replicated)
        return state.replace(
            params=params,
            batch_stats=jax.device_put(stats, self.replicated),
            opt_state=jax.jit(self.tx.init, out_shardings=self.replicated)(params),
            ema_params=jax.tree_util.tree_map(jnp.copy, params) if state.ema_params is not None else None,
        )

    def global_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return {
            k: jax.make_array_from_process_local_data(self.data_sharding, v)
            for k, v in local.items()
            if k in self.task.batch_fields
        }

    def save(self, state: TrainState, force: bool = False) -> None:
        import orbax.checkpoint as ocp

        step = int(state.step)
        _raise_if_nonfinite(state)
        self.checkpoints.save(step, args=ocp.args.StandardSave(state), force=force)

    def evaluate(self, state: TrainState) -> dict[str, float]:
        """Metrics of ``state`` on the eval split, the same on every process.

        Each process reads its shard of the split, all make the same number of (collective) predict calls, the
        detections and the rows' image ids and sizes come back replicated, and process 0 alone scores the
        whole split once and writes the results; the metrics are then broadcast."""
        from scaledet_jax import distributed
        from scaledet_jax.data import pipeline
        from scaledet_jax.evaluate import CocoEvaluator, annotation_json, format_per_class

        self.pictures = []  # ground truth next to predictions for TensorBoard, a fixed handful of images
        params = state.ema_params if state.ema_params is not None else state.params
        variables = {"params": params, "batch_stats": state.batch_stats}
        if self._predict is None:
            self._predict = jax.jit(
                lambda variables, images, rows: (self.task.predict(variables, images), rows),
                in_shardings=(self.replicated, self.data_sharding, self.data_sharding),
                out_shardings=self.replicated,
            )
        predict = self._predict
        main = distributed.is_main_process()
        json_path = annotation_json(self.config, self.workdir, self.builder)
        if main and json_path is None and self.config.data.source == "tfds" and self._ground_truth is None:
            self._ground_truth = pipeline.tfds_ground_truth(self.config, self.builder)  # once per run
        if self.config.get("eval_protocol", "coco") == "voc":
            from scaledet_jax.evaluate_voc import VocEvaluator

            evaluator = VocEvaluator.from_config(self.config, json_path, ground_truth=self._ground_truth)
        else:
            d = self.config.model.detection
            evaluator = CocoEvaluator(
                json_path,
                with_masks=self.config.model.name == "mask_rcnn",
                ground_truth=self._ground_truth,
                plus_one_boxes=d.get("clip", "image") == "plus_one",
                mask_paste=d.get("mask_paste", "torchvision"),
            )
        start = time.perf_counter()
        for batch in pipeline.eval_batches(
            self.config, self.builder, process_index=jax.process_index(), process_count=jax.process_count()
        ):
            images = jax.make_array_from_process_local_data(self.data_sharding, batch["image"])
            rows = {
                k: jax.make_array_from_process_local_data(self.data_sharding, _device_dtype(batch[k]))
                for k in EVAL_ROW_FIELDS
                if k in batch
            }
            detections, rows = jax.device_get(predict(variables, images, rows))  # every process gets all rows
            if main:
                evaluator.add_ground_truth(rows)
                evaluator.add_detections(rows, detections)
                if len(self.pictures) < self.config.get("eval_pictures", 0):
                    mine = distributed.local_rows(self.data_sharding, len(rows["image_id"]))
                    self.pictures += self._pictures(batch, {k: v[mine] for k, v in detections.items()}, evaluator)
        step = int(state.step)
        if main:
            metrics = evaluator.evaluate()
            paths = evaluator.write(self.workdir, step, metrics)
            logging.info(
                "Eval at step %d (%d images, %.1fs): %s; wrote %s",
                step,
                len(evaluator.images),
                time.perf_counter() - start,
                _format(metrics, [k for k in metrics if k.removeprefix("segm_") in SHOWN_METRICS]),
                ", ".join(paths),
            )
            for iou_type, table in evaluator.per_class.items():
                logging.info("Per-class %s AP at step %d:\n%s", iou_type, step, format_per_class(table))
        return distributed.broadcast_json(metrics if main else None)

    def _pictures(self, batch, detections, evaluator) -> list[np.ndarray]:
        from scaledet_jax.tools import visualize

        if jax.process_index() != 0:
            return []
        names = {c["id"]: c["name"] for c in (evaluator.ground_truth or {}).get("categories", [])}
        if evaluator.annotation_json:
            from scaledet_jax.data import coco_folder

            names = self._names = getattr(self, "_names", None) or coco_folder.category_names_from_json(
                evaluator.annotation_json
            )
        spec = self.config.model.input
        return visualize.eval_pictures(
            batch,
            detections,
            tuple(spec.mean),
            tuple(spec.std),
            names,
            self.config.eval_pictures - len(self.pictures),
            bgr=spec.get("channels", "rgb") == "bgr",
        )


# The batch fields the evaluators read (image ids, sizes, and the objects when no json holds them), gathered
# with the detections so that process 0 sees every process's rows.
EVAL_ROW_FIELDS = ("image_id", "original_size", "scale", "boxes", "classes", "valid", "crowd")


def _device_dtype(array: np.ndarray) -> np.ndarray:
    """64-bit host arrays as the 32-bit ones JAX holds (COCO image ids fit in int32)."""
    if array.dtype == np.int64:
        return array.astype(np.int32)
    if array.dtype == np.float64:
        return array.astype(np.float32)
    return array


def _checkpoint_manager(directory: str, config: ml_collections.ConfigDict):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.keep_checkpoints, save_interval_steps=config.checkpoint_every_steps, create=True
    )
    with _quiet_orbax_logs():  # a damaged step folder is reported once, by restore_newest_intact
        return ocp.CheckpointManager(directory, options=options)


def _raise_if_nonfinite(state: TrainState, history: dict[int, Any] | None = None, checkpoints=None) -> None:
    """FloatingPointError naming the first bad step (``TrainState.first_nonfinite_step``) and, from
    that step's metrics in ``history`` (step -> metrics), whether its loss or its update went wrong."""
    bad = int(state.first_nonfinite_step)
    if bad < 0:
        return
    what = f"loss or parameters became NaN or Inf at step {bad}"
    metrics = (history or {}).get(bad)
    if metrics is not None:
        loss, norm, lr = (float(metrics[k]) for k in ("total_loss", "grad_norm", "learning_rate"))
        if not math.isfinite(loss):
            what = f"loss became NaN or Inf at step {bad}"
        else:
            what = (
                f"parameters became NaN or Inf at step {bad}; its update (learning rate {lr:.3g}, gradient norm "
                f"{norm:.3g}) broke them although the loss {loss:.4g} was finite"
            )
    newest = ""
    if checkpoints is not None:
        checkpoints.wait_until_finished()
        latest = checkpoints.latest_step()
        newest = f" (the newest is step {latest} in {checkpoints.directory})" if latest is not None else ""
    raise FloatingPointError(
        f"{what}; stopping without writing a checkpoint{newest}; try a lower learning rate "
        "(optim.base_learning_rate) or gradient clipping (optim.gradient_clip_norm)"
    )


@contextlib.contextmanager
def _quiet_orbax_logs():
    """Drops orbax's own log lines (a failing restore writes many) while a checkpoint is probed."""
    import logging as py_logging

    class _DropOrbax(py_logging.Filter):
        def filter(self, record: py_logging.LogRecord) -> bool:
            return f"{os.sep}orbax{os.sep}" not in record.pathname

    drop, logger = _DropOrbax(), py_logging.getLogger("absl")
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


class _RestoreNoise:
    """What a failed orbax restore prints besides its error: the TensorStore reads still in flight
    complete into the asyncio loop orbax has closed, or are dropped unfinished, and Python reports
    each one (a traceback ending in 'RuntimeError: Event loop is closed', 'Exception ignored in:
    <coroutine ...>' with the full TensorStore spec, asyncio's 'exception was never retrieved'):
    megabytes for one damaged checkpoint. ``restore_newest_intact`` reports a failed restore itself
    (one line), so once installed these are dropped: the closed-loop error, reports from orbax's read
    coroutines (only a restore runs them), and reports naming a folder in ``folders`` (the checkpoints
    while they are probed, then the damaged ones). Every other report still prints."""

    READS = f"{os.sep}orbax{os.sep}checkpoint{os.sep}_src{os.sep}serialization{os.sep}"

    def __init__(self) -> None:
        self.folders: set[str] = set()

    @staticmethod
    def closed_loop(error: BaseException | None) -> bool:
        return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"

    def concerns_restore(self, text: str) -> bool:
        return self.READS in text or any(folder in text for folder in self.folders)

    def filter(self, record) -> bool:  # as a logging filter of the 'asyncio' logger
        return not self.concerns_restore(record.getMessage())

    def install(self) -> None:
        """Wraps sys.excepthook and sys.unraisablehook (unless already wrapped) and filters asyncio's log."""
        import logging as py_logging

        if not getattr(sys.excepthook, "scaledet_jax_restore_noise", False):
            previous_excepthook = sys.excepthook

            def excepthook(kind, error, traceback) -> None:
                if not self.closed_loop(error):
                    previous_excepthook(kind, error, traceback)

            excepthook.scaledet_jax_restore_noise = True
            sys.excepthook = excepthook
        if not getattr(sys.unraisablehook, "scaledet_jax_restore_noise", False):
            previous_unraisablehook = sys.unraisablehook

            def unraisablehook(unraisable) -> None:
                code = getattr(unraisable.object, "cr_code", None)  # an orbax read coroutine closed unfinished
                where = f"{code.co_filename if code else ''} {unraisable.exc_value}"
                if not (self.closed_loop(unraisable.exc_value) or self.concerns_restore(where)):
                    previous_unraisablehook(unraisable)

            unraisablehook.scaledet_jax_restore_noise = True
            sys.unraisablehook = unraisablehook
        asyncio_logger = py_logging.getLogger("asyncio")
        if self not in asyncio_logger.filters:
            asyncio_logger.addFilter(self)


_RESTORE_NOISE = _RestoreNoise()


def _short_reason(error: BaseException) -> str:
    """A failed restore's reason in one short line: the innermost TensorStore status in the chain of
    errors ('OUT_OF_RANGE: Error reading ...'), else the first line of the error itself."""

    def first_line(e: BaseException) -> str:
        return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)

    chain, seen = [], error
    while seen is not None and len(chain) < 10:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    statuses = [first_line(e) for e in chain if re.match(r"^[A-Z][A-Z_]+: ", first_line(e))]
    reason = (statuses[-1] if statuses else first_line(error)).split(" [tensorstore_spec")[0]
    return reason if len(reason) <= 200 else reason[:197] + "..."


def _path_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _tree_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    return {_path_name(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _checkpoint_shapes(item_dir: str) -> dict[str, tuple[int, ...]] | None:
    """Tensor path -> shape from an orbax checkpoint item's metadata; None when that does not read."""
    import orbax.checkpoint as ocp

    if not os.path.isdir(item_dir):
        return None
    try:
        with _quiet_orbax_logs():
            metadata = ocp.StandardCheckpointer().metadata(item_dir)
        tree = getattr(metadata, "item_metadata", metadata)
        tree = getattr(tree, "tree", tree)
        shapes = _tree_shapes(tree)
    except Exception:  # noqa: BLE001 - unreadable metadata is what damage looks like here
        return None
    return shapes or None


def _tree_difference(expected: dict[str, tuple], found: dict[str, tuple]) -> str:
    """The first difference between the config's state and a checkpoint's, in words ('' if none)."""
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    more = lambda names: f" and {len(names) - 1} more" if len(names) > 1 else ""  # noqa: E731
    if missing:
        return f"the config has {missing[0]}{more(missing)}, which the checkpoint lacks"
    if extra:
        return f"the checkpoint has {extra[0]}{more(extra)}, which the config lacks"
    for name in sorted(expected):
        if expected[name] != found[name]:
            return f"{name} has shape {expected[name]} in the config, {found[name]} in the checkpoint"
    return ""


def _write_parameter_overview(workdir: str, params: Any, parameter_overview) -> None:
    """Per-module totals in the log; clu's full per-tensor table in WORKDIR/parameter_overview.txt."""
    path = os.path.join(workdir, "parameter_overview.txt")
    if jax.process_index() == 0:
        with open(path, "w") as f:
            f.write(parameter_overview.get_parameter_overview(params, include_stats=False) + "\n")
    sizes = {name: sum(x.size for x in jax.tree_util.tree_leaves(sub)) for name, sub in params.items()}
    logging.info(
        "Parameters: %s; total %s (per tensor: %s)",
        ", ".join(f"{k} {v:,}" for k, v in sizes.items()),
        f"{sum(sizes.values()):,}",
        path,
    )


SHOWN_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "mAP", "mAP_voc07")  # the eval log line's (COCO, VOC)


def _format(metrics: dict[str, float], keys) -> str:
    return " ".join(f"{k}={'n/a' if metrics[k] != metrics[k] else f'{metrics[k]:.4f}'}" for k in keys if k in metrics)


def _write_pictures(writer, step: int, pictures: list[np.ndarray]) -> None:
    """TensorBoard images ``eval/image_<i>``: ground truth (left) next to predictions (right)."""
    if pictures:
        writer.write_images(step, {f"eval/image_{i}": picture[None] for i, picture in enumerate(pictures)})


def _defined_scalars(metrics: dict[str, float]) -> dict[str, float]:
    """TensorBoard gets the defined metrics only (NaN: no ground truth in that range)."""
    return {f"eval/{k}": v for k, v in metrics.items() if v == v}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, evaluate: bool = True) -> dict[str, Any]:
    """Trains ``config`` in ``workdir`` (resuming from its latest checkpoint) and evaluates at the end.

    Returns {'state': final TrainState, 'eval': COCO metrics or None}.
    """
    from clu import metric_writers, parameter_overview, periodic_actions

    from scaledet_jax.data import pipeline

    _apply_init_from_options(config)
    use_compilation_cache(config.get("compilation_cache_dir", ""))
    run = Run(config, workdir, needs_eval=evaluate)
    writer = metric_writers.create_default_writer(run.workdir, just_logging=jax.process_index() > 0)
    if jax.process_index() == 0:  # what predict and Detector.from_checkpoint(workdir) read: config, class names
        from scaledet_jax import detector

        detector.write_card(run.workdir, config, pipeline.dataset_categories(config, run.workdir, run.builder))
    state = run.restore_or_init()
    start_step = int(state.step)
    if start_step == 0:
        _write_parameter_overview(run.workdir, state.params, parameter_overview)
        writer.write_hparams(
            {
                k: v
                for k, v in flax.traverse_util.flatten_dict(config.to_dict(), sep=".").items()
                if isinstance(v, (int, float, str, bool))
            }
        )
    logging.info(
        "Training %d steps (%d per epoch), global batch %d on %d devices, from step %d",
        run.total_steps,
        run.steps_per_epoch,
        config.data.train_batch_size,
        jax.device_count(),
        start_step,
    )

    step_fn = jax.jit(
        functools.partial(train_step, config, run.task, run.tx, run.schedule, jax.random.key(config.seed + 1)),
        in_shardings=(run.replicated, run.data_sharding),
        out_shardings=(run.replicated, run.replicated),
        donate_argnums=0,
    )
    batches = pipeline.train_batches(
        config, run.builder, start_step=start_step, process_index=jax.process_index(), process_count=jax.process_count()
    )
    report = periodic_actions.ReportProgress(
        num_train_steps=run.total_steps, writer=writer, every_steps=config.log_every_steps
    )
    images_per_step = config.data.train_batch_size
    # Metrics of the steps since the last log line, by step: averaged for the log, and what the NaN
    # guard reads to say whether a bad step's loss or its update went wrong.
    last_time, last_step, pending = time.perf_counter(), start_step, {}
    eval_metrics = None
    last_step_this_run = run.total_steps
    if config.stop_after_steps:  # a time-boxed job: stop early, the next launch resumes
        last_step_this_run = min(run.total_steps, start_step + config.stop_after_steps)
    try:
        for step in range(start_step + 1, last_step_this_run + 1):
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                state, metrics = step_fn(state, run.global_batch(next(batches)))
            if step == start_step + 1:
                jax.block_until_ready(metrics)
                logging.info(
                    "First step (compilation included) took %.1f s%s",
                    time.perf_counter() - last_time,
                    f"; {compilation_cache_hits()} executables from the compilation cache"
                    if config.get("compilation_cache_dir")
                    else "",
                )
            pending[step] = metrics
            if step % config.log_every_steps == 0 or step == run.total_steps:
                _raise_if_nonfinite(state, pending, run.checkpoints)
                summary = {k: float(np.mean([m[k] for m in jax.device_get(list(pending.values()))])) for k in metrics}
                pending = {}
                now = time.perf_counter()
                steps_per_s = (step - last_step) / (now - last_time)
                last_time, last_step = now, step
                eta = (run.total_steps - step) / max(steps_per_s, 1e-9)
                writer.write_scalars(
                    step, {**summary, "steps_per_sec": steps_per_s, "images_per_sec": steps_per_s * images_per_step}
                )
                shown = (*run.task.log_losses, "l2_loss")
                parts = " ".join(f"{k.removesuffix('_loss')} {summary[k]:.4g}" for k in shown)
                logging.info(
                    "step %d/%d  loss %.4f (%s)  lr %.5f  %.2f steps/s  %.1f img/s  ETA %s",
                    step,
                    run.total_steps,
                    summary["total_loss"],
                    parts,
                    summary["learning_rate"],
                    steps_per_s,
                    steps_per_s * images_per_step,
                    time.strftime("%H:%M:%S", time.gmtime(eta)),
                )
            report(step)  # clu's progress/ETA, after the sync above so its timing is real
            if step % config.checkpoint_every_steps == 0 or step in (run.total_steps, last_step_this_run):
                _raise_if_nonfinite(state, pending, run.checkpoints)
                run.save(state, force=step in (run.total_steps, last_step_this_run))
            if evaluate and config.eval_every_steps and step % config.eval_every_steps == 0 and step != run.total_steps:
                _raise_if_nonfinite(state, pending, run.checkpoints)
                writer.write_scalars(step, _defined_scalars(run.evaluate(state)))
                _write_pictures(writer, step, run.pictures)
    except KeyboardInterrupt:
        run.checkpoints.wait_until_finished()
        latest = run.checkpoints.latest_step()
        logging.warning(
            "Interrupted; %s",
            f"the newest checkpoint is step {latest} in {run.checkpoints.directory}: run the same command to resume"
            if latest is not None
            else "no checkpoint was written yet",
        )
        raise
    finally:
        run.checkpoints.wait_until_finished()  # never leave a half-written checkpoint behind
    if int(state.step) < run.total_steps:
        logging.info(
            "Stopped at step %d of %d (stop_after_steps); run again to resume.", int(state.step), run.total_steps
        )
        return {"state": state, "eval": None}
    if evaluate:
        eval_metrics = run.evaluate(state)
        writer.write_scalars(int(state.step), _defined_scalars(eval_metrics))
        _write_pictures(writer, int(state.step), run.pictures)
    writer.flush()
    return {"state": state, "eval": eval_metrics}


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Evaluates the latest checkpoint in ``workdir`` (or ``config.init_from`` when it has none)."""
    # Evaluating a converted checkpoint itself (no run yet): with its own classes.
    _apply_init_from_options(config, keep_source_classes=_has_no_checkpoint(workdir))
    use_compilation_cache(config.get("compilation_cache_dir", ""))
    if not config.init_from and not os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise UserError(
            f"no checkpoint in {os.path.join(os.path.abspath(workdir), 'checkpoints')}; train first, point --workdir "
            "at a run, or evaluate a converted checkpoint with --config.init_from=DIR"
        )
    run = Run(config, workdir, needs_eval=True)
    if run.checkpoints.latest_step() is None and not config.init_from:
        raise UserError(
            f"no checkpoint in {run.checkpoints.directory}; train first, point --workdir at a run, "
            "or evaluate a converted checkpoint with --config.init_from=DIR"
        )
    return run.evaluate(run.restore_or_init())


def _has_no_checkpoint(workdir: str) -> bool:
    from scaledet_jax import detector

    return detector.newest_checkpoint(workdir) is None


CLASS_OPTIONS = ("num_classes", "category_ids", "background_slot")  # a source's class layout


def _is_run(path: str) -> bool:
    from scaledet_jax.convert import checkpoint

    return not os.path.isfile(os.path.join(path, checkpoint.INFO_FILE)) and os.path.isdir(
        os.path.join(path, "checkpoints")
    )


def init_from_variables(path: str) -> dict[str, Any]:
    """{'params', 'batch_stats'} of ``init_from``: a converted directory, or a training run's newest checkpoint
    (its EMA parameters when it kept them)."""
    from scaledet_jax import detector
    from scaledet_jax.convert import checkpoint

    if _is_run(path):
        step_dir = detector.newest_checkpoint(path)
        if step_dir is None:
            raise UserError(f"init_from {path}: no finished checkpoint in {os.path.join(path, 'checkpoints')}")
        return detector.restore_variables(step_dir)
    return checkpoint.load_converted(path)


def init_from_num_classes(path: str) -> int | None:
    """The class count ``init_from``'s weights were made for (None when its source does not say)."""
    from scaledet_jax import detector
    from scaledet_jax.convert import checkpoint

    if _is_run(path):
        config, _ = detector.read_card(path)
        return int(config.model.num_classes) if config is not None else None
    count = checkpoint.read_info(path).get("model_options", {}).get("num_classes")
    return int(count) if count is not None else None


def _apply_init_from_options(config: ml_collections.ConfigDict, keep_source_classes: bool = False) -> None:
    """A converted checkpoint brings the model options its source's semantics need (padding, ...). Its class
    layout (``CLASS_OPTIONS``) too when the config asks for as many classes as it has, or with
    ``keep_source_classes`` (evaluating the checkpoint as it is); otherwise the config's classes win and
    ``Run._load_converted`` re-initialises the class-dependent tensors."""
    if not config.get("init_from"):
        return
    from scaledet_jax.convert import checkpoint

    if _is_run(config.init_from):
        return  # trained here: no foreign semantics; its class count is read when its weights are loaded
    options = dict(checkpoint.read_info(config.init_from).get("model_options", {}))
    source_classes = options.get("num_classes")
    if not keep_source_classes and source_classes is not None and source_classes != config.model.num_classes:
        options = {k: v for k, v in options.items() if k not in CLASS_OPTIONS}
        logging.info(
            "init_from %s was trained on %d classes; the config's %d classes are kept (fine-tuning on other classes)",
            config.init_from,
            source_classes,
            config.model.num_classes,
        )
    for change in checkpoint.set_model_options(config, options):
        logging.info("init_from %s sets %s", config.init_from, change)
