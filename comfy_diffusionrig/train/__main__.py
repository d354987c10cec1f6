"""`python -m comfy_diffusionrig.train` (as torchrun -m runs it): the train command of train/command.py."""

import sys

from .command import main

sys.exit(main())
