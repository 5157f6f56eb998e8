"""`python -m fastgw`: the same as the `fastgw` command."""
from fastgw.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
