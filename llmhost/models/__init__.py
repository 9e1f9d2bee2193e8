"""Models and their lifecycle: the module-level registry (the one owner of
loaded models), loading from a hub id, folder or GGUF (loading, gguf), dtypes
and quantization, the memory policy (memory), checks of a load request
(checks), load progress, the crash journal, start-up preloads and which models
are on disk (ondisk).

May import: config, engine. Never api/ or generation/."""
