"""``python -m coordinator.demo [ARGS]``: the same as ``fedsilo-coordinator demo [ARGS]``."""

import sys

from coordinator.demo import main

sys.exit(main())
