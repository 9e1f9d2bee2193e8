"""`python -m llmhost`: the same command as `llmhost` (llmhost/cli.py)."""
from .cli import main

main(prog_name="llmhost")
