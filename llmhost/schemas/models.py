from marshmallow import fields, validate

from ..http.extensions import Schema
from ..models.loading import DTYPES
from ..models.quantize import QUANTIZATIONS

TASKS = ["generate", "embed", "rerank", "transcribe"]
DEVICE = validate.Regexp(r"^(auto|cpu|cuda(:\d+)?|mps)$",
                         error="Use one of auto, cpu, cuda, cuda:N, mps.")


class LoadModelSchema(Schema):
    model = fields.String(required=True, validate=validate.Length(min=1, max=4096), metadata={
        "description": "A Hugging Face hub id (`gpt2`, `org/name`), a local model folder, or a "
                       "local `.gguf` file.", "example": "HuggingFaceTB/SmolLM2-135M-Instruct"})
    id = fields.String(validate=validate.Length(min=1, max=256), metadata={
        "description": "The id clients use for this model (default: `model`)."})
    device = fields.String(load_default="auto", validate=DEVICE, metadata={
        "description": "`auto` (CUDA, else MPS, else CPU; several GPUs: device_map=auto), `cpu`, "
                       "`cuda`, `cuda:N`, `mps`."})
    dtype = fields.String(load_default="auto", validate=validate.OneOf(["auto", *DTYPES]), metadata={
        "description": "`auto` is the checkpoint's dtype on GPU; on CPU bfloat16 for generation "
                       "models where the CPU has native bf16 (AVX512-BF16, AMX), else float32."})
    quantization = fields.String(allow_none=True, validate=validate.OneOf(QUANTIZATIONS), metadata={
        "description": "`int8`: int8 weights (per output channel) for the Linear layers, on CPU; "
                       "computes in float32. `int4`: a GGUF file's own Q4_0 / Q4_1 weights kept "
                       "4-bit (torch's int4 CPU kernel), on CPU; computes in bfloat16."})
    revision = fields.String(allow_none=True, validate=validate.Length(min=1, max=256),
                             metadata={"description": "Hub branch, tag or commit."})
    gguf_file = fields.String(allow_none=True, validate=validate.Length(min=1, max=1024), metadata={
        "description": "A GGUF file inside the folder or hub repo (dequantized by transformers)."})
    trust_remote_code = fields.Boolean(load_default=False, metadata={
        "description": "Refused unless the server sets LLMHOST_ALLOW_REMOTE_CODE=1."})
    task = fields.String(allow_none=True, validate=validate.OneOf(TASKS), metadata={
        "description": "Override task detection: `generate` (chat, completions), `embed`, "
                       "`rerank` (cross-encoders: /v1/rerank, /v1/score) or `transcribe` "
                       "(Whisper: /v1/audio/transcriptions)."})
    chat_template = fields.String(allow_none=True, metadata={
        "description": "A Jinja chat template that replaces the model's own (or the fallback)."})
    allow_control_tokens = fields.Boolean(load_default=False, metadata={
        "description": "`true`: control tokens (`<|im_start|>`, `<|endoftext|>`, ...) that "
                       "clients write in messages become the real tokens, so a client can "
                       "write whole turns itself. Default `false`: they are encoded as "
                       "plain text; only the chat template writes control tokens."})
    keep_alive = fields.Float(allow_none=True, validate=validate.Range(min=0), metadata={
        "description": "Unload after this many idle seconds (0: never; default LLMHOST_KEEP_ALIVE)."})
    base = fields.String(allow_none=True, validate=validate.Length(min=1, max=4096), metadata={
        "description": "llmhost extra. Load `model` as a PEFT LoRA adapter onto this loaded base "
                       "model (its id); requests naming the adapter's id run base + adapter, "
                       "batched with the base's other requests."})
    aliases = fields.List(fields.String(validate=validate.Length(min=1, max=256)),
                          allow_none=True, validate=validate.Length(max=64), metadata={
        "description": "Other names that reach this model on every API (e.g. `gpt-4o`, "
                       "`claude-sonnet-4-5`); a loaded model's own id always wins over an alias."})
    stream = fields.Boolean(metadata={
        "description": "llmhost extra. `true`: answer server-sent events of load progress "
                       "(`object: model.load.progress`), then the Model object, then `[DONE]`; "
                       "an error while loading comes as an error event."})


class ListModelsQuerySchema(Schema):
    include = fields.String(validate=validate.OneOf(["cached"]), metadata={
        "description": "`cached` also lists what loads offline: models in the local HF cache, "
                       "and `.gguf` files and model folders under LLMHOST_MODEL_DIRS."})


class ModelSchema(Schema):
    """The OpenAI Model object plus llmhost fields."""

    id = fields.String(required=True)
    object = fields.String(required=True, metadata={"enum": ["model"]})
    created = fields.Integer(required=True)
    owned_by = fields.String(required=True)
    status = fields.String(metadata={"enum": ["loaded", "loading", "cached"]})
    task = fields.String(metadata={"enum": TASKS})
    source = fields.String()
    gguf_file = fields.String(allow_none=True)
    device = fields.String()
    dtype = fields.String()
    quantization = fields.String(allow_none=True)
    parameters = fields.Integer()
    memory_bytes = fields.Integer()
    load_seconds = fields.Float()
    revision = fields.String(allow_none=True)
    max_context = fields.Integer()
    dimensions = fields.Integer(metadata={"description": "Size of the vectors (embedding models)."})
    keep_alive = fields.Float(allow_none=True)
    input_modalities = fields.List(fields.String(), metadata={
        "description": "Vision-language models: `[\"text\", \"image\"]` (chat takes image_url "
                       "parts)."})
    base = fields.String(metadata={"description": "LoRA adapters: the id of the base model they "
                                                  "run on."})
    aliases = fields.List(fields.String(), metadata={
        "description": "Names that reach this model (load option `aliases` and "
                       "LLMHOST_MODEL_ALIASES)."})
    alias_of = fields.String(metadata={"description": "An alias entry: the id it reaches."})
    size_on_disk = fields.Integer()
    format = fields.String(metadata={"enum": ["hub", "gguf", "folder"],
                                     "description": "Cached entries: where the files are."})
    phase = fields.String(metadata={"enum": ["resolving", "downloading", "loading"],
                                    "description": "While loading: what the load is doing."})
    step = fields.String(metadata={"description": "While loading: the step under way."})
    fraction = fields.Float(metadata={"description": "While loading: share of the phase done, "
                                                     "where its total is known."})
    elapsed_seconds = fields.Float()
    downloaded_bytes = fields.Integer()
    download_total_bytes = fields.Integer()
    loaded_tensors = fields.Integer()
    total_tensors = fields.Integer()


class UnloadModelQuerySchema(Schema):
    force = fields.Boolean(load_default=False, metadata={
        "description": "Unload a base model together with the LoRA adapters loaded onto it "
                       "(without it: 409 naming them)."})


class ListModelsSchema(Schema):
    object = fields.String(required=True, metadata={"enum": ["list"]})
    data = fields.List(fields.Nested(ModelSchema), required=True)


class DeletedModelSchema(Schema):
    id = fields.String(required=True)
    object = fields.String(required=True)
    deleted = fields.Boolean(required=True)
