"""A request becomes a generation: prompts and chat templates (prompt,
reasoning), tools and grammars (tools, callgrammar), output parsing (parsing,
text, callguard), the Responses API's items (conversation) and the run that
drives the engine and hands out deltas (run).

May import: config, engine, models. Never api/ or http/."""
