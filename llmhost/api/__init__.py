"""One blueprint module per resource; MODULES registers them in order."""
from . import health, models

MODULES = (health, models)
