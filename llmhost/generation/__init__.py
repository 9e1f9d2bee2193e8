"""A typed request becomes a generation: the typed requests the schemas load
into (request), the Plan that building one returns (plan: build_chat,
build_completion, chat_ids), prompts and chat templates (prompt, reasoning),
tools and grammars (tools, callgrammar), output parsing (parsing, text,
callguard), the Responses API's items (conversation) and the run that drives
the engine and hands out deltas (run).

May import: config, engine, models. Never api/, http/, schemas/ or store/
(tests/test_imports.py checks it); errors are engine/errors.py's domain errors."""
