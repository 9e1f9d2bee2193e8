"""One blueprint module per resource; MODULES registers them in order."""
from . import anthropic, chat, completions, embeddings, health, models, ollama, responses, tokenize

MODULES = (health, models, chat, completions, embeddings, responses, tokenize, anthropic, ollama)
