"""One blueprint module per resource; MODULES registers them in order."""
from . import chat, completions, health, models

MODULES = (health, models, chat, completions)
