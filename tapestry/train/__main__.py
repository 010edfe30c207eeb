"""`python -m tapestry.train train CONFIG --out RUN_DIR` (what torchrun runs with -m)."""

from tapestry.train.cli import app

app()
