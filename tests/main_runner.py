"""`python -m fvq_jax.main FLAGS...` in this process: the absl flags parsed from FLAGS (a config file with its
`:arg`, `--config.<field>=<value>` overrides, `--workdir`), then `main.main`, as `app.run` would, without the
start-up of a new interpreter. SystemExit carries a non-zero exit status, as from the command."""

import sys

from absl import flags, logging

from fvq_jax import main


def run_main(*argv: str) -> None:
    saved_argv, verbosity = sys.argv, logging.get_verbosity()
    # ml_collections' config flag reads its --config.<field> overrides from sys.argv, not from the parsed list.
    sys.argv = ["fvq_jax.main", *argv]
    flags.FLAGS.unparse_flags()
    try:
        main.main(flags.FLAGS(sys.argv))
    finally:
        flags.FLAGS.unparse_flags()
        sys.argv = saved_argv
        logging.set_verbosity(verbosity)  # main() lowers it for the console; later tests keep theirs
