"""`python -m parlm.train`: see `parlm.train.loop.main`."""
import sys

from parlm.train.loop import main

if __name__ == "__main__":
    sys.exit(main())
