"""`python -m parlm.eval`: see `parlm.eval.stage.main`."""
from parlm.eval.stage import main

if __name__ == "__main__":
    main()
