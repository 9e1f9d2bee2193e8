"""One blueprint module per resource; MODULES registers them in order."""
from . import chat, completions, embeddings, health, models, responses, tokenize, usage

MODULES = (health, models, chat, completions, embeddings, responses, tokenize, usage)
