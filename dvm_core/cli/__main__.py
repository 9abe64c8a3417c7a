"""`python -m dvm_core.cli`: the same as the `dvm` command."""

from . import main

main()
