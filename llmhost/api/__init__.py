"""One blueprint module per resource; MODULES registers them in order."""
from . import chat, completions, embeddings, health, models

MODULES = (health, models, chat, completions, embeddings)
