"""One blueprint module per resource; MODULES registers them in order.

A route is thin: typed request -> generation/plan.py's Plan -> serving.serve
(serving.py) -> its format. Routes never import routes; what they share is in
serving.py (running a Plan) and access.py (which model a caller may use)."""
from . import (audio, chat, completions, embeddings, health, models, rerank, responses, tokenize,
               usage)

MODULES = (health, models, chat, completions, embeddings, responses, tokenize, rerank, audio,
           usage)
