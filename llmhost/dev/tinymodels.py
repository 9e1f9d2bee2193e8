"""Small random-weight models built offline, for the tests and the benchmark.

The tokenizer is a byte-level BPE trained with `tokenizers` on local text, so
every byte sequence (emoji, CJK) round-trips; the models are saved with
`save_pretrained` exactly as a Hub checkout would hold them.
"""
from __future__ import annotations

import os
import random

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# A Qwen2.5-style template (written for these tests, same shapes as Qwen's):
# tools listed in the system turn inside <tools>, calls as <tool_call> JSON,
# results as <tool_response> in a user turn.
TOOL_CHAT_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n"
    "{% if messages[0].role == 'system' %}{{ messages[0].content }}\n\n{% endif %}"
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "<tools>{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, "
    "\"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n"
    "{% elif messages[0].role == 'system' %}<|im_start|>system\n{{ messages[0].content }}"
    "<|im_end|>\n{% endif %}"
    "{% for message in messages %}"
    "{% if message.role == 'system' %}"
    "{% elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}"
    "\n</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ message.role }}\n{{ message.content or '' }}"
    "{% for call in message.tool_calls or [] %}"
    "{% set call = call.function if call.function is defined else call %}"
    "\n<tool_call>\n{\"name\": \"{{ call.name }}\", \"arguments\": {{ call.arguments | tojson }}}"
    "\n</tool_call>{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# A Qwen3-style thinking template (written for these tests): the
# `enable_thinking` switch of Qwen3 / SmolLM3 (false: an empty thought is
# prefilled, so the model answers at once), a thought opened for the model
# otherwise (as Qwen3-Thinking and DeepSeek-R1 templates prefill "<think>"),
# and gpt-oss' "Reasoning: <effort>" system line when `reasoning_effort` is set.
THINKING_CHAT_TEMPLATE = (
    "{% if reasoning_effort is defined and reasoning_effort %}<|im_start|>system\n"
    "Reasoning: {{ reasoning_effort }}<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}"
    "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
    "{% else %}<think>\n{% endif %}{% endif %}"
)

WORDS = ("the quick brown fox jumps over lazy dog hello world model server token stream chat "
         "completion answer question paris france capital city river mountain sea sky blue green "
         "red one two three four five six seven eight nine ten and or but if then else when why "
         "how what who user assistant system tool data value error request response python code "
         "héllo naïve café 日本語 中文 한국어 emoji 🙂 🚀 ✓ ünïcödé").split()


def corpus(lines: int = 4000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 24))) for _ in range(lines)]


def build_tokenizer(vocab_size: int = 512, chat: bool = False):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<|endoftext|>"] + (["<|im_start|>", "<|im_end|>"] if chat else [])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer=trainer)
    eos = "<|im_end|>" if chat else "<|endoftext|>"
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", pad_token=eos)
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def build_qwen2_tools(path: str, layers: int = 2, width: int = 64, vocab_size: int = 512,
                      positions: int = 1024, seed: int = 0) -> str:
    """A Qwen2-architecture chat model with a tool-aware Qwen2.5-style template;
    <tool_call>, </tool_call>, <think> and </think> are tokens (not special, so
    they stay in decoded text, as in Qwen's tokenizer)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tokenizer(vocab_size, chat=True)
    tokenizer.add_tokens(["<tool_call>", "</tool_call>", "<think>", "</think>",
                          "<tool_response>", "</tool_response>"])
    tokenizer.chat_template = TOOL_CHAT_TEMPLATE
    return _decoder(path, tokenizer, Qwen2Config, Qwen2ForCausalLM, layers, width, positions, seed,
                    tie_word_embeddings=False)


def build_qwen3_thinking(path: str, layers: int = 2, width: int = 64, vocab_size: int = 512,
                         positions: int = 1024, seed: int = 0) -> str:
    """A Qwen3-architecture chat model with THINKING_CHAT_TEMPLATE; <think> and
    </think> are tokens, as in Qwen3's tokenizer."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = build_tokenizer(vocab_size, chat=True)
    tokenizer.add_tokens(["<think>", "</think>"])
    tokenizer.chat_template = THINKING_CHAT_TEMPLATE
    return _decoder(path, tokenizer, Qwen3Config, Qwen3ForCausalLM, layers, width, positions, seed,
                    head_dim=width // 4, tie_word_embeddings=False)


def build_gpt2(path: str, layers: int = 2, width: int = 64, vocab_size: int = 512,
               positions: int = 256, seed: int = 0) -> str:
    """A GPT-2 base model with no chat template."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = build_tokenizer(vocab_size)
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=positions, n_embd=width,
                        n_layer=layers, n_head=max(1, width // 64) if width >= 64 else 2,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = GPT2LMHeadModel(config)
    _save(model, tokenizer, path)
    return path


def build_llama(path: str, layers: int = 2, width: int = 64, vocab_size: int = 512,
                positions: int = 512, seed: int = 0) -> str:
    """A Llama chat model with a chat template and <|im_end|> as EOS."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(vocab_size, chat=True)
    return _decoder(path, tokenizer, LlamaConfig, LlamaForCausalLM, layers, width, positions, seed)


def _decoder(path: str, tokenizer, config_class, model_class, layers: int, width: int,
             positions: int, seed: int, **extra) -> str:
    """A random decoder-only model of a Llama-like family (4 heads, 2 KV heads,
    MLP twice as wide) around `tokenizer`, saved to `path`."""
    import torch

    torch.manual_seed(seed)
    config = config_class(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=width * 2,
                          num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=positions, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                          **extra)
    _save(model_class(config), tokenizer, path)
    return path


def _save(model, tokenizer, path: str) -> None:
    os.makedirs(path, exist_ok=True)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def write_hub_cache(folder: str, hf_home: str, repo_id: str, sha: str = "0" * 40) -> str:
    """Copy a saved model into the Hub-cache layout under HF_HOME
    (hub/models--org--name/refs/main + snapshots/<sha>/...)."""
    import shutil

    repo = os.path.join(hf_home, "hub", "models--" + repo_id.replace("/", "--"))
    snapshot = os.path.join(repo, "snapshots", sha)
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    shutil.copytree(folder, snapshot, dirs_exist_ok=True)
    with open(os.path.join(repo, "refs", "main"), "w") as fh:
        fh.write(sha)
    return snapshot


# Special tokens and end of turn of the families build_family_tools imitates
# (the real tokenizers mark these special; the tiny ones do too, so decoding
# skips them unless the output parser asks for them).
FAMILY_TOKENS = {
    "llama": {"bos": "<|begin_of_text|>", "eos": "<|eot_id|>",
              "special": ["<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
                          "<|python_tag|>"]},
    "mistral": {"bos": "<s>", "eos": "</s>",
                "special": ["[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]",
                            "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"]},
    # Qwen 3.5's call and thought tags are plain (not special) tokens, as in Qwen's tokenizer.
    "qwen3_5": {"bos": "<|endoftext|>", "eos": "<|im_end|>", "special": ["<|im_start|>"],
                "plain": ["<tool_call>", "</tool_call>", "<think>", "</think>", "<tool_response>",
                          "</tool_response>"]},
    "gemma4": {"bos": "<bos>", "eos": "<turn|>",
               "special": ["<|turn>", "<|tool>", "<tool|>", "<|tool_call>", "<tool_call|>",
                           "<|tool_response>", "<tool_response|>", '<|"|>', "<|channel>",
                           "<channel|>", "<|think|>"]},
}


def build_family_tools(path: str, family: str, chat_template: str, layers: int = 2,
                       width: int = 64, vocab_size: int = 512, positions: int = 4096,
                       seed: int = 0) -> str:
    """A tiny random model of `family` ("llama": Llama 3.x, "mistral", "qwen3_5":
    Qwen 3.5's template on a Qwen2 body, "gemma4": Gemma 4's on a Llama body) with
    that family's real chat template (the caller reads it from a file) and its
    special tokens, so tools, calls and results render exactly as for the real
    model, and its calls come out in the family's own syntax."""
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                              Qwen2Config, Qwen2ForCausalLM)

    tokens = FAMILY_TOKENS[family]
    tokenizer = build_tokenizer(vocab_size)
    tokenizer.add_special_tokens({"bos_token": tokens["bos"], "eos_token": tokens["eos"],
                                  "pad_token": tokens["eos"],
                                  "additional_special_tokens": tokens["special"]})
    tokenizer.add_tokens(tokens.get("plain", []))
    tokenizer.chat_template = chat_template
    config_class, model_class = {"llama": (LlamaConfig, LlamaForCausalLM),
                                 "mistral": (MistralConfig, MistralForCausalLM),
                                 "qwen3_5": (Qwen2Config, Qwen2ForCausalLM),
                                 "gemma4": (LlamaConfig, LlamaForCausalLM)}[family]
    return _decoder(path, tokenizer, config_class, model_class, layers, width, positions, seed,
                    tie_word_embeddings=False)


def build_cross_encoder(path: str, layers: int = 2, width: int = 32, positions: int = 128,
                        seed: int = 0) -> str:
    """A BERT cross-encoder (BertForSequenceClassification, one label) saved by
    sentence-transformers' CrossEncoder, so the folder holds its cross-encoder
    config as a real reranker's does. The tokenizer is a WordPiece one over
    WORDS and their characters (a BERT tokenizer needs a vocabulary, not training)."""
    import torch
    from sentence_transformers import CrossEncoder
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    chars = sorted({c for word in WORDS for c in word} | set("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"))
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(WORDS)) + chars + ["##" + c for c in chars]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    tokenizer = BertTokenizer(vocab=vocab, model_max_length=positions)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=width, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=width * 2,
                        max_position_embeddings=positions, num_labels=1)
    raw = path + ".raw"
    BertForSequenceClassification(config).save_pretrained(raw)
    tokenizer.save_pretrained(raw)
    CrossEncoder(raw, device="cpu", local_files_only=True).save_pretrained(path)
    return path


WHISPER_LANGUAGES = ("en", "fr", "de")


def build_whisper(path: str, vocab_size: int = 400, width: int = 32, max_new_tokens: int = 12,
                  multilingual: bool = True, seed: int = 0) -> str:
    """A Whisper model (WhisperForConditionalGeneration + WhisperProcessor) with
    Whisper's special tokens laid out as in the real tokenizer (<|endoftext|>
    right after the byte-level BPE, then <|startoftranscript|>, languages, tasks,
    <|startofprev|>, <|notimestamps|>, 1501 timestamps). The generation config
    suppresses the special and timestamp tokens (random weights would emit
    nothing else) and stops after `max_new_tokens`, so outputs are short."""
    import json

    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import (GenerationConfig, WhisperConfig, WhisperFeatureExtractor,
                              WhisperForConditionalGeneration, WhisperProcessor, WhisperTokenizer)

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(corpus(), trainer=trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    data = json.loads(bpe.to_str())
    vocab = data["model"]["vocab"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in data["model"]["merges"]]
    vocab["<|endoftext|>"] = len(vocab)   # the lowest special id, as Whisper's tokenizer expects
    tokenizer = WhisperTokenizer(vocab=vocab, merges=merges)
    languages = [f"<|{code}|>" for code in WHISPER_LANGUAGES] if multilingual else ["<|en|>"]
    special = (["<|startoftranscript|>"] + languages + ["<|translate|>", "<|transcribe|>",
               "<|startoflm|>", "<|startofprev|>", "<|nospeech|>", "<|notimestamps|>"])
    tokenizer.add_special_tokens({"additional_special_tokens": special})
    timestamps = [f"<|{i * 0.02:.2f}|>" for i in range(1501)]
    tokenizer.add_tokens(timestamps)
    ids = tokenizer.convert_tokens_to_ids
    eos = ids("<|endoftext|>")
    torch.manual_seed(seed)
    config = WhisperConfig(vocab_size=len(tokenizer), num_mel_bins=80, d_model=width,
                           encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                           decoder_attention_heads=2, encoder_ffn_dim=width * 2,
                           decoder_ffn_dim=width * 2, max_source_positions=1500,
                           max_target_positions=64, pad_token_id=eos, bos_token_id=eos,
                           eos_token_id=eos, decoder_start_token_id=ids("<|startoftranscript|>"),
                           begin_suppress_tokens=None, suppress_tokens=None)
    model = WhisperForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=config.decoder_start_token_id, eos_token_id=eos, pad_token_id=eos,
        bos_token_id=eos, max_new_tokens=max_new_tokens, is_multilingual=multilingual,
        lang_to_id={token: ids(token) for token in languages},
        task_to_id={"transcribe": ids("<|transcribe|>"), "translate": ids("<|translate|>")},
        no_timestamps_token_id=ids("<|notimestamps|>"), prev_sot_token_id=ids("<|startofprev|>"),
        begin_suppress_tokens=[eos], suppress_tokens=[ids(t) for t in special + timestamps],
        max_initial_timestamp_index=50)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=80),
                     tokenizer=tokenizer).save_pretrained(path)
    return path


# A chat template for the tiny vision-language model: content as parts, each
# image part as one <image> token, which the processor expands into the
# image's patch tokens (as LLaVA's does).
VISION_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_llava(path: str, layers: int = 2, width: int = 64, vocab_size: int = 512,
                positions: int = 512, image_size: int = 28, patch: int = 14, seed: int = 0) -> str:
    """A LLaVA vision-language model: a 2-layer CLIP vision tower on 28x28
    images (4 patch tokens per image), a projector and a tiny Llama, with a
    LlavaProcessor built locally (Pillow image processor, the tiny tokenizer
    with an <image> token, VISION_CHAT_TEMPLATE). LLaVA because its processor
    is fully configurable offline and its language model takes plain 1-D
    positions, as the scheduler feeds them."""
    import torch
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = build_tokenizer(vocab_size, chat=True)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.chat_template = VISION_CHAT_TEMPLATE
    images = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                   crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=patch,
                               vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=VISION_CHAT_TEMPLATE)
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, image_size=image_size, patch_size=patch,
                              projection_dim=32)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=width * 2,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=positions, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default", vision_feature_layer=-1)
    _save(LlavaForConditionalGeneration(config), tokenizer, path)
    processor.save_pretrained(path)
    return path
