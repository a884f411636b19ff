"""``python -m pml_largest_margin.cli``: the ``pml-lm`` command without the installed script."""

import sys

from . import main

sys.exit(main())
