"""`python -m tapestry.data video ...` runs the data CLI without the main `tapestry` command."""

from tapestry.data.cli import main

main()
