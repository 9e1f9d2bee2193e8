"""Models and their lifecycle: the module-level registry (the one owner of
loaded models), loading from a hub id, folder or GGUF (loading, gguf), dtypes
and quantization, the memory policy (memory), checks of a load request
(checks), load progress, the crash journal and which models are on disk
(ondisk). Errors are engine/errors.py's domain errors (NotFound, NotPermitted,
...), mapped to HTTP by http/errors.py.

May import: config, engine. Never api/, generation/, http/, schemas/, store/
or server/."""
