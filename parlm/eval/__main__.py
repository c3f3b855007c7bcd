"""`python -m parlm.eval`: see `parlm.eval.stage.main`."""
import sys

from parlm.eval.stage import main

if __name__ == "__main__":
    sys.exit(main())
