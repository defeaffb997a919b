"""``python -m supsup_lite <experiment> ...``: the reproducible experiment CLI (``scenarios.experiments``)."""
import sys

from .scenarios.experiments import main

sys.exit(main())
