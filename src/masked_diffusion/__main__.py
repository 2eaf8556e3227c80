"""Run the command line with ``python -m masked_diffusion``; see :mod:`masked_diffusion.cli`."""

from __future__ import annotations

import sys

from masked_diffusion.cli import main

if __name__ == "__main__":
    sys.exit(main())
