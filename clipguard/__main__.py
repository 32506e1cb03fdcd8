"""`python -m clipguard`: the same as the `clipguard` command."""

from clipguard.cli.main import main

# Guarded: worker processes started with "spawn" (side_by_side_pool) import this module again.
if __name__ == "__main__":
    main()
