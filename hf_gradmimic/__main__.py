"""``python -m hf_gradmimic`` is the ``gradmimic`` command."""

import sys

from .cli import main

sys.exit(main())
