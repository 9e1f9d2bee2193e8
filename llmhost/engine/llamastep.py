"""The scheduler's forward for Llama-architecture models (SmolLM2, Llama 2/3 and
the many fine-tunes that keep Llama's modules): transformers' own layers'
arithmetic, without the Python around it.

A decode step of a small model is mostly not arithmetic: SmolLM2 int4 on two
cores spent ~3 ms of a ~13 ms step in transformers' module calls, keyword
plumbing, output classes and decorators (``capture_outputs``,
``deprecate_kwarg``, ``merge_with_config_defaults``), which llama.cpp does not
have. ``LlamaStep`` runs the same tensor operations in the same order on the
same modules' weights, with transformers' own mask builder, rotary module and
attention function, so its logits are bit-identical to ``model(...)``'s
(tests/test_llamastep.py checks it, decode and prefill, float32, bfloat16 and
int4). Where the model's int4 layers were grouped at load (quantize.Q4Group:
q/k/v, gate/up), one kernel call computes the group (the kernel computes each
output feature on its own, so that is bit-identical too). A model whose every
layer runs on llmhost's int4 kernel has its decoder layers run in one call into
llamastep.c instead (``_Native``: what the torch loop computes, rounded alike;
that file says where the last bits can differ).

Only models built exactly of transformers' Llama classes take this path
(``LlamaStep.for_model`` returns None for anything else, and the scheduler
keeps ``model(...)``); a forward with LoRA adapters or image inputs keeps
``model(...)`` too (peft's hooks live in its module calls).
"""
from __future__ import annotations

import ctypes
import logging
import os
import weakref

import torch

from . import attention
from .kvcache import GrowingLayer
from .native import COMPILE, compile_library, cpu_flags, once

log = logging.getLogger(__name__)

HALF = (torch.bfloat16, torch.float16)
SOURCE = os.path.join(os.path.dirname(__file__), "llamastep.c")
_P, _N = ctypes.c_void_p, ctypes.c_int64


class _Proj(ctypes.Structure):
    """llamastep.c's struct proj: a projection as q_linear takes it."""
    _fields_ = [("bits", _N), ("n", _N), ("qs", _P), ("d", _P), ("m", _P)]


class _LayerArgs(ctypes.Structure):
    """llamastep.c's struct layer."""
    _fields_ = [("norm1", _P), ("norm2", _P), ("eps1", ctypes.c_double), ("eps2", ctypes.c_double),
                ("qkv", _Proj), ("o", _Proj), ("gate_up", _Proj), ("down", _Proj),
                ("keys", _P), ("values", _P), ("kst", _N * 3), ("vst", _N * 3)]


@once
def _library() -> tuple[ctypes.CDLL | None, str]:
    """llamastep.c built and loaded: (the library, "") or (None, why not)."""
    # its element-wise steps 16 lanes at a time where the CPU has AVX-512 (llamastep.c)
    wide = ("-mavx512f",) if "avx512f" in cpu_flags() else ()
    lib, why = compile_library(SOURCE, COMPILE + ("-ffp-contract=off",) + wide)
    if lib is None:
        log.info("int4 steps run their layers in torch: llamastep.c is unavailable (%s)", why)
        return None, why
    lib.llama_layers.argtypes = [ctypes.c_int, _N, ctypes.POINTER(_LayerArgs), _N, _N, _N, _N, _N,
                                 _N, _N, _N, _P, _P, _P, _P, ctypes.c_double, _P, _P, ctypes.c_int]
    lib.llama_layers.restype = ctypes.c_int
    return lib, ""


def _gone() -> None:
    """A weak reference's call once its object is gone: _Native.held's start."""
    return None


class _Native:
    """The decoder layers in one call into llamastep.c (it says why), for a
    model whose every layer it can run (``build``)."""

    def __init__(self, lib, linear: int, attend: int, layers: list, projections: list,
                 config, dtype: torch.dtype) -> None:
        self.lib, self.linear, self.attend = lib, linear, attend
        self.bf16 = int(dtype == torch.bfloat16)
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.dim, self.hidden = layers[0].head_dim, config.hidden_size
        self.inter, self.scale = config.intermediate_size, layers[0].attn.scaling
        self.args = (_LayerArgs * len(layers))()
        # per layer, weak references to the cache buffers its args hold (__call__): a
        # decode step sets them only where a buffer changed (~20 us of SmolLM2's step)
        self.held = [(_gone, _gone)] * len(layers)
        for args, layer, products in zip(self.args, layers, projections):
            args.norm1, args.norm2 = layer.norm1.data_ptr(), layer.norm2.data_ptr()
            args.eps1, args.eps2 = layer.eps1, layer.eps2
            args.qkv, args.o, args.gate_up, args.down = (_Proj(*p[1:]) for p in products)

    @classmethod
    def build(cls, model, layers: list) -> "_Native | None":
        """A _Native when every layer's products are ones llamastep.c can call
        the kernel for (a ``native_linear()``: models/quantize.py's Q4Group for
        q/k/v and gate/up, Q4Linear for o and down; no bias), the MLP's
        activation is SiLU, the norms hold the model's dtype (bfloat16 or
        float32), the shapes fit its loops, and it and the attention build;
        else None (the layers stay in torch)."""
        from transformers.activations import SiLUActivation

        config = model.config
        dtype = model.model.norm.weight.dtype
        if not layers or dtype not in (torch.bfloat16, torch.float32) or \
                config.hidden_act != "silu" or config.hidden_size % 8 or config.intermediate_size % 8 \
                or config.num_attention_heads * layers[0].head_dim != config.hidden_size:
            return None
        projections = []
        for layer in layers:
            parts = (layer.qkv, layer.o_proj, layer.gate_up, layer.down)
            if not (all(callable(getattr(p, "native_linear", None)) and getattr(p, "bias", None) is None
                        for p in parts)
                    and type(layer.act) in (SiLUActivation, torch.nn.SiLU) and "forward" not in vars(layer.act)
                    and layer.head_dim == layers[0].head_dim and layer.attn.scaling == layers[0].attn.scaling
                    and layer.norm1.dtype == layer.norm2.dtype == dtype):
                return None
            projections.append([p.native_linear() for p in parts])
        lib, attend = _library()[0], attention._library()[0]
        linear = {p[0] for products in projections for p in products}
        if lib is None or attend is None or len(linear) != 1:
            return None
        return cls(lib, linear.pop(), ctypes.cast(attend.attend, _P).value, layers, projections,
                   config, dtype)

    def __call__(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 mask: torch.Tensor | None, cache) -> torch.Tensor:
        """h [batch, length, hidden]: each sequence's last row after every layer,
        the others after all but the last (a step keeps the last position's
        logits: llama_layers); the cache's new positions written and joined."""
        batch, length, _ = h.shape
        h = h.contiguous()
        cos, sin = cos.contiguous(), sin.contiguous()
        like = torch.empty((batch, self.kv_heads, length, self.dim), dtype=h.dtype)
        layers = cache.layers[:len(self.args)]
        past = 0
        for i, (args, layer) in enumerate(zip(self.args, layers)):
            past = layer.reserve(like, like)
            keys, values = layer._keys_buf, layer._values_buf
            held = self.held[i]   # the buffers args point at: set again only where they changed
            if held[0]() is not keys or held[1]() is not values:
                args.keys, args.values = keys.data_ptr(), values.data_ptr()
                args.kst[:], args.vst[:] = keys.stride()[:3], values.stride()[:3]
                self.held[i] = (weakref.ref(keys), weakref.ref(values))
        if mask is not None:
            mask = mask.to(torch.uint8).contiguous()
        if self.lib.llama_layers(self.bf16, len(self.args), self.args, batch, length, past,
                                 self.hidden, self.heads, self.kv_heads, self.dim, self.inter,
                                 h.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                                 mask.data_ptr() if mask is not None else None, self.scale,
                                 self.linear, self.attend, torch.get_num_threads()):
            raise torch.OutOfMemoryError("llamastep.c: no memory for a step's activations")
        for layer in layers:
            layer.advance(length)
        return h

# transformers' model code is imported by the first load (after models/lean.py
# has kept torchao, scipy and triton out of it), never by importing the engine:
# the imports below are inside the functions that run after a load.


def _rms(weight: torch.Tensor, eps: float, h: torch.Tensor) -> torch.Tensor:
    """LlamaRMSNorm.forward, op for op."""
    dtype = h.dtype
    x = h.to(torch.float32)
    variance = x.pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + eps)
    return weight * x.to(dtype)


class _Layer:
    """One decoder layer's modules and constants, looked up once."""

    __slots__ = ("index", "norm1", "eps1", "qkv", "o_proj", "norm2", "eps2", "gate_up",
                 "down", "act", "attn", "head_dim")

    def __init__(self, index: int, layer) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.index, self.attn, self.head_dim = index, attn, attn.head_dim
        self.norm1, self.eps1 = layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon
        self.norm2, self.eps2 = (layer.post_attention_layernorm.weight,
                                 layer.post_attention_layernorm.variance_epsilon)
        # a quantize.Q4Group made at load: one kernel call for the layers reading one input
        self.qkv = getattr(attn, "q4_group", None) or \
            (lambda x, a=attn: (a.q_proj(x), a.k_proj(x), a.v_proj(x)))
        self.gate_up = getattr(mlp, "q4_group", None) or \
            (lambda x, m=mlp: (m.gate_proj(x), m.up_proj(x)))
        self.o_proj, self.down, self.act = attn.o_proj, mlp.down_proj, mlp.act_fn


class LlamaStep:
    """``step(ids, mask, positions, cache)``: the last position's logits
    [rows, 1, vocab], what ``model(..., logits_to_keep=1).logits`` is."""

    def __init__(self, model) -> None:
        from transformers.masking_utils import create_causal_mask
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        from transformers.models.llama import modeling_llama as llama

        self.model, self.mask = model, create_causal_mask
        base = model.model
        self.embed, self.rotary, self.norm, self.head = base.embed_tokens, base.rotary_emb, base.norm, \
            model.lm_head
        self.attention = ALL_ATTENTION_FUNCTIONS.get_interface(
            model.config._attn_implementation, llama.eager_attention_forward)
        # grouped-query attention with SDPA (where the packed call is the faster one)
        self.packs_gqa = model.config._attn_implementation == "sdpa" and \
            model.config.num_attention_heads != model.config.num_key_value_heads
        self.layers = [_Layer(i, layer) for i, layer in
                       enumerate(base.layers[:model.config.num_hidden_layers])]
        # decode steps on llmhost's CPU attention (attention.py says why)
        first = self.layers[0].attn if self.layers else None
        self.own_attention = first is not None and attention.supports(
            self.norm.weight.dtype, self.norm.weight.device, first.head_dim,
            model.config.num_attention_heads, model.config.num_key_value_heads)
        # Every forward on it too where each linear layer computes a row alone (llmhost's
        # int4 kernel: quantize.Q4Linear.rows_alone): then nothing in a forward depends on
        # the other rows, the padding or how a sequence is split into forwards, so a
        # position's keys and values are the same however they were computed (prompt
        # chunks of any size, decode steps in any batch), which lets the prefix cache
        # reuse any token prefix (scheduler.py). Elsewhere prefill keeps transformers'
        # attention, whose rounding depends on the shapes (the cache reuses whole chunks).
        self.rows_alone = self.own_attention and all(
            getattr(getattr(getattr(layer, part), name, None), "rows_alone", False)
            for layer in base.layers[:model.config.num_hidden_layers]
            for part, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                                ("mlp", ("gate_proj", "up_proj", "down_proj")))
            for name in names)
        # a rows_alone model's layers in one call into llamastep.c, where it can run them
        self.native = _Native.build(model, self.layers) if self.rows_alone else None

    @classmethod
    def for_model(cls, model) -> "LlamaStep | None":
        """A LlamaStep when `model` is exactly transformers' Llama (classes not
        subclassed, no hub kernel swapped into a forward, no tensor-parallel
        split), else None."""
        from transformers.models.llama import modeling_llama as llama

        if type(model) is not llama.LlamaForCausalLM or type(model.model) is not llama.LlamaModel \
                or getattr(model.config, "pretraining_tp", 1) != 1 \
                or len(set((getattr(model, "hf_device_map", None) or {}).values())) > 1:
            return None   # (a model spread over devices: accelerate's hooks move the states)
        norms = [model.model.norm]
        for layer in model.model.layers:
            if type(layer) is not llama.LlamaDecoderLayer or type(layer.self_attn) is not llama.LlamaAttention \
                    or type(layer.mlp) is not llama.LlamaMLP or layer.self_attn.training:
                return None
            norms += [layer.input_layernorm, layer.post_attention_layernorm]
        if any(type(n) is not llama.LlamaRMSNorm or "forward" in vars(n) for n in norms):
            return None
        return cls(model)

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                 cache, decode: bool = False) -> torch.Tensor:
        """LlamaForCausalLM.forward with a cache and logits_to_keep=1, op for op;
        a `decode` step (one position per row), and every forward of a
        ``rows_alone`` model, on llmhost's attention where it runs (then equal
        to it up to the order of the attention's sums); a ``rows_alone`` model's
        layers in llamastep.c where it runs them (``_Native``)."""
        h = self.embed(ids)
        batch, length = ids.shape
        own = self.own_attention and (self.rows_alone or (decode and length == 1))
        if own:   # the rows' keys: all of them (None), or those the mask keeps (left padding)
            causal = None if bool(mask.all()) else mask
        else:
            causal = self.mask(config=self.model.config, inputs_embeds=h, attention_mask=mask,
                               cache=cache, position_ids=positions)
        if not own and causal is None and length == 1 and self.packs_gqa and h.dtype in HALF:
            # a lone row's decode step: an all-true mask steers transformers' attention
            # function to its packed-GQA call instead of SDPA's enable_gqa, which on the
            # CPU ran 5.6x slower in bfloat16 at 1,700 positions (727 against 130 us a
            # layer) and gives the same bits (tests/test_llamastep.py)
            causal = torch.ones((batch, 1, 1, cache.get_seq_length() + 1), dtype=torch.bool,
                                device=h.device)
        cos, sin = self.rotary(h, position_ids=positions)
        # transformers' rotate_half(x) * sin is cat(-x2, x1) * sin; x.roll(half) * cat(-sin1,
        # sin2) is cat(x2 * -sin1, x1 * sin2): the same bits (a sign flip is exact), one op
        # instead of four per tensor and layer
        half = sin.shape[-1] // 2
        sin = torch.cat((-sin[..., :half], sin[..., half:]), -1)
        if own and self.native is not None and \
                all(type(layer) is GrowingLayer for layer in getattr(cache, "layers", ())):
            h = self.native(h, cos, sin, causal, cache)
            return self.head(_rms(self.norm.weight, self.norm.variance_epsilon, h[:, -1:, :]))
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)         # apply_rotary_pos_emb's unsqueeze
        for layer in self.layers:
            h = self._layer(layer, h, cos, sin, cache, causal, own)
        return self.head(_rms(self.norm.weight, self.norm.variance_epsilon, h)[:, -1:, :])

    def _layer(self, layer: _Layer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache,
               causal: torch.Tensor | None, own: bool) -> torch.Tensor:
        """One decoder layer in torch (what llamastep.c computes where it runs):
        h after it, its keys and values added to `cache`."""
        batch, length = h.shape[:2]
        half = sin.shape[-1] // 2
        x = _rms(layer.norm1, layer.eps1, h)
        q, k, v = (t.view(batch, length, -1, layer.head_dim).transpose(1, 2) for t in layer.qkv(x))
        q = (q * cos) + (q.roll(half, -1) * sin)
        k = (k * cos) + (k.roll(half, -1) * sin)
        k, v = cache.update(k, v, layer.index)
        if own:
            out = attention.attend(q, k, v, causal, layer.attn.scaling)
        else:
            out, _ = self.attention(layer.attn, q, k, v, causal, dropout=0.0,
                                    scaling=layer.attn.scaling)
        h = h + layer.o_proj(out.reshape(batch, length, -1).contiguous())
        x = _rms(layer.norm2, layer.eps2, h)
        gate, up = layer.gate_up(x)
        return h + layer.down(layer.act(gate) * up)
