"""`python -m llmhost`: the same command as `llmhost` (llmhost/server/cli.py)."""
from .server.cli import main

main(prog_name="llmhost")
