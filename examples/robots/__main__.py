"""`python -m examples.robots`: see `sagaline/demo/robots/__main__.py`."""

import sys

from sagaline.demo.robots.__main__ import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m examples.robots"))
