"""`python -m clipguard`: the same as the `clipguard` command."""

from clipguard.cli.main import main

main()
