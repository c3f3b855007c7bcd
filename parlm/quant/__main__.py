"""`python -m parlm.quant`: see `parlm.quant.stage.main`."""
from parlm.quant.stage import main

if __name__ == "__main__":
    main()
