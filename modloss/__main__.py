"""``python -m modloss``: the ``modloss`` command, e.g. under ``torchrun -m modloss train``."""

from modloss.cli import main

main()
