"""The whole run: ``train_and_evaluate(config, workdir)`` and ``evaluate(config, workdir)``.

config -> data (tf.data on the host) -> model -> loss and train step (jit over a device mesh,
batch sharded on 'data', state replicated and donated) -> orbax checkpoints and clu metrics ->
COCO evaluation. The same code runs on one CPU, several devices and several hosts; batch norm
statistics are computed over the global batch (cross-replica BN) because the step is one jit
over globally sharded arrays.
"""

from __future__ import annotations

import functools
import math
import os
import re
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

from scaledet_jax.cli import UserError
from scaledet_jax.tasks import Task, build_task
from scaledet_jax.tasks.retinanet import category_index_table, model_anchors  # noqa: F401 - public names kept here


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    ema_params: Any  # a copy of params when EMA is on, else None
    first_nonfinite_step: jax.Array  # -1, or the first step whose loss was NaN/Inf


# ---------------------------------------------------------------------------------------------
# Set-up
# ---------------------------------------------------------------------------------------------


def make_mesh() -> jax.sharding.Mesh:
    """All devices on one 'data' axis (Auto axis type: sharded BN steps need it in this JAX)."""
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


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
    """The task's losses of a global batch plus the L2 penalty; returns (total, (parts, new batch_stats))."""
    parts, new_stats = task.losses({"params": params, "batch_stats": batch_stats}, batch, rng, train)
    parts = dict(parts)
    parts["l2_loss"] = l2_penalty(params, config.loss.l2_weight_decay, tuple(config.optim.get("frozen", ())))
    parts["total_loss"] = parts["model_loss"] + parts["l2_loss"]
    return parts["total_loss"], (parts, new_stats)


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
    finite = jnp.isfinite(parts["total_loss"])
    bad = jnp.where((state.first_nonfinite_step < 0) & ~finite, state.step, state.first_nonfinite_step)
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

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        from scaledet_jax.data import pipeline

        self.config, self.workdir = config, os.path.abspath(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self.mesh = make_mesh()
        self.replicated = NamedSharding(self.mesh, P())
        self.data_sharding = NamedSharding(self.mesh, P("data"))
        for name, size in (("train", config.data.train_batch_size), ("eval", config.data.eval_batch_size)):
            if size % jax.device_count():
                raise UserError(f"data.{name}_batch_size {size} must be a multiple of the {jax.device_count()} devices")
        self.task = build_task(config)
        self.model = self.task.model
        self._predict = None  # the jitted predict function, compiled once per run
        self.builder = pipeline.get_builder(config, self.workdir)
        try:
            num_train = self.builder.info.splits[config.data.train_split].num_examples
        except KeyError:
            if not config.total_steps:
                raise UserError(f"split {config.data.train_split!r} not found; set data.train_split") from None
            num_train = config.total_steps * config.data.train_batch_size
        self.steps_per_epoch = max(num_train // config.data.train_batch_size, 1)
        self.total_steps = config.total_steps or int(math.ceil(config.num_epochs * self.steps_per_epoch))
        self.schedule = learning_rate_schedule(config, self.steps_per_epoch, self.total_steps)
        self.tx = make_optimizer(config, self.schedule)
        self.checkpoints = _checkpoint_manager(os.path.join(self.workdir, "checkpoints"), config)

    def abstract_state(self) -> TrainState:
        shapes = jax.eval_shape(lambda: init_state(self.config, self.task, self.tx, jax.random.key(0)))
        return jax.tree_util.tree_map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self.replicated), shapes
        )

    def restore_or_init(self) -> TrainState:
        latest = self.checkpoints.latest_step()
        if latest is not None:
            import orbax.checkpoint as ocp

            logging.info("Resuming from checkpoint at step %d in %s", latest, self.checkpoints.directory)
            return self.checkpoints.restore(latest, args=ocp.args.StandardRestore(self.abstract_state()))
        init = jax.jit(lambda rng: init_state(self.config, self.task, self.tx, rng), out_shardings=self.replicated)
        state = init(jax.random.key(self.config.seed))
        if self.config.init_from:
            state = self._load_converted(state)
        return state

    def _load_converted(self, state: TrainState) -> TrainState:
        from scaledet_jax.convert import checkpoint

        loaded = checkpoint.load_converted(self.config.init_from)
        params, n_params, fresh = checkpoint.merge_into(
            jax.device_get(state.params), loaded.get("params", {}), "params"
        )
        stats, n_stats, _ = checkpoint.merge_into(
            jax.device_get(state.batch_stats), loaded.get("batch_stats", {}), "batch_stats"
        )
        logging.info(
            "Initialised %d parameter and %d statistics tensors from %s; %d parameter tensors keep their random init",
            n_params,
            n_stats,
            self.config.init_from,
            fresh,
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
        from scaledet_jax.data import pipeline
        from scaledet_jax.evaluate import CocoEvaluator

        params = state.ema_params if state.ema_params is not None else state.params
        variables = {"params": params, "batch_stats": state.batch_stats}
        if self._predict is None:
            self._predict = jax.jit(
                self.task.predict, in_shardings=(self.replicated, self.data_sharding), out_shardings=self.replicated
            )
        predict = self._predict
        evaluator = CocoEvaluator()
        start = time.perf_counter()
        for batch in pipeline.eval_batches(
            self.config, self.builder, process_index=jax.process_index(), process_count=jax.process_count()
        ):
            images = jax.make_array_from_process_local_data(self.data_sharding, batch["image"])
            detections = jax.device_get(predict(variables, images))
            # Every host sees all detections (replicated output); each keeps its own images' rows.
            local = slice(
                jax.process_index() * len(batch["image_id"]), (jax.process_index() + 1) * len(batch["image_id"])
            )
            evaluator.add_ground_truth(batch)
            evaluator.add_detections(batch, {k: v[local] for k, v in detections.items()})
        metrics = evaluator.evaluate()
        step = int(state.step)
        if jax.process_index() == 0:
            paths = evaluator.write(self.workdir, step, metrics)
            logging.info(
                "Eval at step %d (%d images, %.1fs): %s; wrote %s",
                step,
                len(evaluator.images),
                time.perf_counter() - start,
                _format(metrics, ("AP", "AP50", "AP75", "APs", "APm", "APl")),
                ", ".join(paths),
            )
        return metrics


def _checkpoint_manager(directory: str, config: ml_collections.ConfigDict):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.keep_checkpoints, save_interval_steps=config.checkpoint_every_steps, create=True
    )
    return ocp.CheckpointManager(directory, options=options)


def _raise_if_nonfinite(state: TrainState) -> None:
    bad = int(state.first_nonfinite_step)
    if bad >= 0:
        raise FloatingPointError(
            f"loss became NaN or Inf at step {bad}; stopping without writing a checkpoint "
            "(try a lower learning rate or gradient clipping)"
        )


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


def _format(metrics: dict[str, float], keys) -> str:
    return " ".join(f"{k}={metrics[k]:.4f}" for k in keys if k in metrics)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, evaluate: bool = True) -> dict[str, Any]:
    """Trains ``config`` in ``workdir`` (resuming from its latest checkpoint) and evaluates at the end.

    Returns {'state': final TrainState, 'eval': COCO metrics or None}.
    """
    from clu import metric_writers, parameter_overview, periodic_actions

    from scaledet_jax.data import pipeline

    _apply_init_from_options(config)
    run = Run(config, workdir)
    writer = metric_writers.create_default_writer(run.workdir, just_logging=jax.process_index() > 0)
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
    last_time, last_step, pending = time.perf_counter(), start_step, []
    eval_metrics = None
    last_step_this_run = run.total_steps
    if config.stop_after_steps:  # a time-boxed job: stop early, the next launch resumes
        last_step_this_run = min(run.total_steps, start_step + config.stop_after_steps)
    try:
        for step in range(start_step + 1, last_step_this_run + 1):
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                state, metrics = step_fn(state, run.global_batch(next(batches)))
            pending.append(metrics)
            if step % config.log_every_steps == 0 or step == run.total_steps:
                _raise_if_nonfinite(state)
                summary = {k: float(np.mean([m[k] for m in jax.device_get(pending)])) for k in pending[0]}
                pending = []
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
                run.save(state, force=step in (run.total_steps, last_step_this_run))
            if evaluate and config.eval_every_steps and step % config.eval_every_steps == 0 and step != run.total_steps:
                writer.write_scalars(step, {f"eval/{k}": v for k, v in run.evaluate(state).items()})
    finally:
        run.checkpoints.wait_until_finished()  # never leave a half-written checkpoint behind
    if int(state.step) < run.total_steps:
        logging.info(
            "Stopped at step %d of %d (stop_after_steps); run again to resume.", int(state.step), run.total_steps
        )
        return {"state": state, "eval": None}
    if evaluate:
        eval_metrics = run.evaluate(state)
        writer.write_scalars(int(state.step), {f"eval/{k}": v for k, v in eval_metrics.items()})
    writer.flush()
    return {"state": state, "eval": eval_metrics}


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Evaluates the latest checkpoint in ``workdir`` (or ``config.init_from`` when it has none)."""
    _apply_init_from_options(config)
    run = Run(config, workdir)
    if run.checkpoints.latest_step() is None and not config.init_from:
        raise UserError(
            f"no checkpoint in {run.checkpoints.directory}; train first, point --workdir at a run, "
            "or evaluate a converted checkpoint with --config.init_from=DIR"
        )
    return run.evaluate(run.restore_or_init())


def _apply_init_from_options(config: ml_collections.ConfigDict) -> None:
    """A converted checkpoint brings the model options its source's semantics need (padding, ...)."""
    if config.get("init_from"):
        from scaledet_jax.convert import checkpoint

        for change in checkpoint.apply_model_options(config, config.init_from):
            logging.info("init_from %s sets %s", config.init_from, change)
