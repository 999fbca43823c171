"""``python -m trace_jax.cli ...`` = ``trace-jax ...`` (for environments without the console script)."""
import sys

from trace_jax.cli import main

sys.exit(main())
