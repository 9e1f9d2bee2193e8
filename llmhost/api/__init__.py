"""One blueprint module per resource; MODULES registers them in order.

A route is thin: typed request -> generation/plan.py's Plan -> serving.serve
(serving.py) -> its format. Routes never import routes; what they share is in
serving.py (running a Plan), access.py (which model a caller may use), and the
shared paths chatpath.py, loads.py and vectors.py."""
from . import (anthropic, audio, chat, completions, embeddings, health, models, ollama, rerank,
               responses, tokenize, usage)

MODULES = (health, models, chat, completions, embeddings, responses, tokenize, anthropic, ollama,
           rerank, audio, usage)
