"""``python -m kdlm``: the same as the ``kdlm`` command (so ``accelerate launch -m kdlm distill`` works)."""

from kdlm.cli import main

raise SystemExit(main())
