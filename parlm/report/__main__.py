"""`python -m parlm.report`: see `parlm.report.summary.main`."""
import sys

from parlm.report.summary import main

if __name__ == "__main__":
    sys.exit(main())
