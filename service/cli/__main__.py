"""`python -m service.cli …` is `bitplan …`."""

import sys

from service.cli import main

sys.exit(main())
