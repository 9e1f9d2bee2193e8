"""Import what a load needs when it needs it: transformers' model code without
the optional packages a server never uses.

Importing ``transformers.modeling_utils`` (the first model load does) imports,
whenever they are installed (MiB of worker RSS, measured here with
``python -m llmhost.dev.bench memory``, docs/performance.md "Memory"):

- torchao (100-160): ``transformers.quantizers`` imports every quantizer, and
  ``quantizer_torchao`` imports torchao at module level when it is available,
  for saving torchao-quantized checkpoints. llmhost imports torchao itself for
  ``quantization: "int8"`` (models/quantize.py), and only then;
- scipy (about 37): ``transformers.loss`` imports every loss, and the
  object-detection losses import ``scipy.optimize.linear_sum_assignment`` for
  training;
- triton (about 70): ``torch._dynamo`` (which transformers' masking code
  imports) imports triton when the package is there. Triton compiles GPU
  kernels only; here it is installed because xgrammar depends on it.

Why this way: transformers reads ``is_torchao_available()`` /
``is_scipy_available()`` at the top of those modules and offers no switch, and
uninstalling torchao would lose int8. So ``prepare()`` imports exactly those
transformers modules once, with the two checks answering False while they
import, then puts the real checks back into every module imported meanwhile
(so ``TorchAoConfig`` and friends keep working) and gives the two modules lazy
stand-ins for the names they would have imported (``flatten_tensor_state_dict``
for saving a torchao model, ``linear_sum_assignment`` for detection losses),
which import their package on first call. On a machine without CUDA or XPU,
torch's ``has_triton_package()`` answers False, which is the truth there for
what torch uses it for (inductor's CPU backend compiles C++, not triton); on
a GPU machine nothing changes. boto3 looks absent while those modules import
(``sys.modules["boto3"] = None``: ``find_spec`` answers None), and the
SageMaker prompts get a lazy stand-in module that imports it on first use.
Nothing else is patched, and nothing at all when transformers' modeling code
was already imported.
"""
from __future__ import annotations

import sys
import threading
import types

_lock = threading.Lock()
_done = False

HIDDEN = ("is_torchao_available", "is_scipy_available")
# the transformers modules that import torchao / scipy at their top when available
MODULES = ("transformers.quantizers", "transformers.loss.loss_utils")


def _lazy(module: str, name: str):
    def stand_in(*args, **kwargs):
        import importlib
        return getattr(importlib.import_module(module), name)(*args, **kwargs)
    stand_in.__name__ = name
    return stand_in


# what a module skipped by each hidden check would have imported
LAZY = {
    "is_torchao_available": _lazy("torchao.prototype.safetensors.safetensors_support",
                                  "flatten_tensor_state_dict"),
    "is_scipy_available": _lazy("scipy.optimize", "linear_sum_assignment"),
}


# packages that look absent while MODULES import (accelerate's SageMaker prompts: boto3)
ABSENT = ("boto3",)


class _LazyModule(types.ModuleType):
    """Stands for a package a module skipped: imports it on first attribute use."""

    def __getattr__(self, attr: str):
        import importlib
        return getattr(importlib.import_module(self.__name__), attr)


def _no_triton_here() -> None:
    import torch
    import torch.utils._triton as triton_check

    gpu = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
    if not gpu and "triton" not in sys.modules and "torch._dynamo" not in sys.modules:
        triton_check.has_triton_package = lambda: False


def prepare() -> None:
    """Once per process, before the first model load imports transformers'
    model code (models/loading.py calls it)."""
    global _done
    if _done:
        return
    with _lock:
        if _done:
            return
        _done = True
        if "transformers.modeling_utils" in sys.modules:
            return  # someone imported it first: nothing left to save
        _no_triton_here()
        import importlib

        import transformers.utils as tu
        import transformers.utils.import_utils as iu

        real = {name: getattr(iu, name) for name in HIDDEN}
        fake = {name: (lambda *a, **k: False) for name in HIDDEN}
        before = set(sys.modules)
        absent = [name for name in ABSENT if name not in sys.modules]
        for name in absent:
            sys.modules[name] = None
        for name in HIDDEN:
            setattr(tu, name, fake[name])
            setattr(iu, name, fake[name])
        try:
            for module in MODULES:
                importlib.import_module(module)
        finally:
            for name in absent:
                del sys.modules[name]
            for name in HIDDEN:
                setattr(tu, name, real[name])
                setattr(iu, name, real[name])
            for key in set(sys.modules) - before:
                namespace = getattr(sys.modules[key], "__dict__", {})
                for name in HIDDEN:
                    if namespace.get(name) is fake[name]:
                        namespace[name] = real[name]
                        _give_stand_in(namespace, LAZY[name])
                for name in absent:
                    _give_stand_in(namespace, _LazyModule(name), f"import {name}")


def _give_stand_in(namespace: dict, stand_in, needle: str = "") -> None:
    """The stand-in, where the module's code names what it skipped (or holds
    `needle`)."""
    if stand_in.__name__ in namespace or not str(namespace.get("__file__")).endswith(".py"):
        return
    try:
        with open(namespace["__file__"], encoding="utf-8") as fh:
            named = (needle or stand_in.__name__) in fh.read()
    except (OSError, UnicodeDecodeError):
        return
    if named:
        namespace[stand_in.__name__] = stand_in
