"""scaledet_jax entry point.

    python main.py --config=configs/spinenet49.py --workdir=runs/spinenet49 [--config.key=value ...]
                   [--mode=profile]

Thin on purpose: flags in, one library call out. Modes available now:
  profile   trainable parameters and FLOPs of the config's model (scaledet_jax.tools.profile)
"""

from absl import flags

from scaledet_jax.cli import UserError, config_from_flags, define_config_flag, run_app

define_config_flag()
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and evaluation results.")
flags.DEFINE_enum("mode", "profile", ["profile"], "What to run.")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}")
    config = config_from_flags()
    if FLAGS.mode == "profile":
        from scaledet_jax.tools import profile

        print(profile.format_table(FLAGS["config"].config_filename, profile.profile(config)))


if __name__ == "__main__":
    run_app(main, "main.py")
