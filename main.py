"""scaledet_jax entry point.

    python main.py --config=configs/spinenet49.py --workdir=runs/spinenet49 [--config.key=value ...]
                   [--mode=train_and_eval|train|eval|profile|browse]
                   [--multihost [--coordinator_address=HOST:PORT --num_processes=N --process_id=I]]

Thin on purpose: flags in, one library call out. Several hosts (a TPU pod slice, a multi-node GPU job) run the
same command with --multihost on every host (README: Multi-host).
  train_and_eval  train (resuming from WORKDIR's latest checkpoint), then COCO evaluation
  train           train only
  eval            evaluate WORKDIR's latest checkpoint
  profile         trainable parameters and FLOPs of the config's model
  browse          draw the first augmented training examples with their boxes (WORKDIR/browse.png)

Exit status: 0 done; 2 a mistake in the command, config, data or paths (one line `main.py: error: ...`);
1 the run failed (NaN/Inf guard, out of memory: one line) or a bug (traceback); 130 interrupted
(Ctrl-C; run the same command to resume). The rules: scaledet_jax/cli.py.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags, logging  # noqa: E402

from scaledet_jax.cli import UserError, config_from_flags, define_config_flag, run_app  # noqa: E402

define_config_flag()
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and evaluation results.")
flags.DEFINE_enum("mode", "train_and_eval", ["train_and_eval", "train", "eval", "profile", "browse"], "What to run.")
flags.DEFINE_integer("browse_images", 8, "With --mode=browse: how many augmented training examples to draw.")
flags.DEFINE_bool(
    "multihost",
    False,
    "One of several processes training together: jax.distributed.initialize() (Cloud TPU, SLURM, Open MPI and "
    "Kubernetes are detected by JAX; elsewhere give the three flags below).",
)
flags.DEFINE_string("coordinator_address", "", "With --multihost: process 0's HOST:PORT.")
flags.DEFINE_integer("num_processes", None, "With --multihost: how many processes take part.")
flags.DEFINE_integer("process_id", None, "With --multihost: this process's index, 0 .. num_processes-1.")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}")
    config = config_from_flags()
    if FLAGS.mode == "profile":
        from scaledet_jax.tools import profile

        print(profile.format_table(FLAGS["config"].config_filename, profile.profile(config)))
        return
    if not FLAGS.workdir:
        raise UserError("--workdir is required for training and evaluation, e.g. --workdir=runs/quickstart")
    from scaledet_jax import distributed, train

    if FLAGS.mode == "browse":
        from scaledet_jax.tools import browse

        path = browse.browse(config, FLAGS.workdir, FLAGS.browse_images)
        logging.info("Wrote %s", path)
        print(f"Wrote {path}")
        return
    distributed.initialize(FLAGS.multihost, FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    if FLAGS.mode == "eval":
        metrics = train.evaluate(config, FLAGS.workdir)
    else:
        metrics = train.train_and_evaluate(config, FLAGS.workdir, evaluate=FLAGS.mode == "train_and_eval")["eval"]
    if metrics:
        from scaledet_jax.evaluate import summary_lines

        for line in summary_lines(metrics):
            logging.info(line)
            print(line)


if __name__ == "__main__":
    run_app(main, "main.py")
