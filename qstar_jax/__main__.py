"""`python -m qstar_jax ...` runs the `qstar-jax` command line."""

import sys

from qstar_jax.cli import main

if __name__ == "__main__":
  sys.exit(main())
