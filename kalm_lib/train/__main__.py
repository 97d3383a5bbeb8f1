"""``python -m kalm_lib.train`` (also under ``torchrun`` / ``accelerate launch``): see :mod:`kalm_lib.train.cli`."""

import sys

from kalm_lib.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
