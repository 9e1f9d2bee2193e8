"""One blueprint module per resource; MODULES registers them in order."""
from . import (audio, chat, completions, embeddings, health, models, rerank, responses, tokenize,
               usage)

MODULES = (health, models, chat, completions, embeddings, responses, tokenize, rerank, audio,
           usage)
