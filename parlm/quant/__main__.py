"""`python -m parlm.quant`: see `parlm.quant.stage.main`."""
import sys

from parlm.quant.stage import main

if __name__ == "__main__":
    sys.exit(main())
