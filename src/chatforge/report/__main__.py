"""`python -m chatforge.report RUN`: the same as `chatforge report RUN`."""

import sys

from chatforge.report import main

sys.exit(main(sys.argv[1:]))
