"""`python -m flows <command> ...` is the same as the `tourguide` console script."""

from flows.cli import main

if __name__ == "__main__":
    main()
