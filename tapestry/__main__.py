"""`python -m tapestry ...` is the `tapestry` command (for environments without the script on PATH)."""

from tapestry.cli import main

if __name__ == "__main__":
    main()
