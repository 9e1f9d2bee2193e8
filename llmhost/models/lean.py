"""Import what a load needs when it needs it: transformers' model code without
the optional packages a server never uses.

Importing ``transformers.modeling_utils`` and its generation code (the first
model load does) imports, whenever they are installed (MiB of RSS, measured
here with ``python -m llmhost.dev.bench memory``, docs/performance.md
"Memory"):

- torchao (100-160): ``transformers.quantizers`` imports every quantizer, and
  ``quantizer_torchao`` imports torchao at module level when it is available,
  for saving torchao-quantized checkpoints. llmhost imports torchao itself for
  ``quantization: "int8"`` (models/quantize.py), and only then;
- scipy (about 37): ``transformers.loss`` imports every loss, and the
  object-detection losses import ``scipy.optimize.linear_sum_assignment`` for
  training;
- kernels (about 5): ``transformers.integrations.hub_kernels`` imports the
  Hub-kernels package (transformers requires it) to swap layers' forwards for
  kernels downloaded from the Hub when a load asks for ``use_kernels``, which
  llmhost never does;
- torch._dynamo (about 30; triton, about 70, came with it where installed):
  transformers' masking code imports one class from it
  (``TransformGetItemToIndex``, for masks built with ``vmap``), and a few
  modules mark functions for ``torch.compile`` as they import
  (``torch.compiler.disable``, ``torch._dynamo.assume_constant_result`` /
  ``allow_in_graph``);
- sympy (about 30): torch.distributed.tensor, which transformers' weight
  loader imports, imports three names of torch's symbolic-shapes module, which
  imports sympy;
- torch.distributed.tensor and torch.distributed.fsdp (about 11 with what they
  import): transformers' tensor-parallel, expert-parallel and FSDP modules
  import them in ``if is_torch_distributed_available():`` blocks at their top,
  with the classes, functions and parallel-plan registrations that use them,
  for models sharded over processes, which llmhost never does.

Why this way: transformers reads ``is_torchao_available()`` /
``is_scipy_available()`` / ``is_kernels_available()`` /
``is_torch_distributed_available()`` at the top of those modules and offers no
switch, and uninstalling torchao would lose int8. So
``prepare()`` imports exactly those transformers modules once (MODULES), with
the checks answering False while they import, then puts the real checks back
into every module imported meanwhile (so ``TorchAoConfig`` and friends keep
working) and gives the modules lazy stand-ins for the names they would have
imported (``flatten_tensor_state_dict`` for saving a torchao model,
``linear_sum_assignment`` for detection losses; hub_kernels defines plain
decorators of its own), which import their package on first call. The
distributed check's blocks bind more (classes, functions, registrations), so
each name they would have bound is the real object where that costs nothing (a
module or a name of a module already imported: ``torch.distributed`` itself)
and otherwise a ``_SkippedMeta`` stand-in: its first use runs the skipped
blocks in their modules, as their import would have, and from then on it is
the real object; a class check against a class of a module never imported
(``DTensor``) answers False without importing it, since nothing can be an
instance of it. transformers' ``from_pretrained`` uses them, so a model
folder's load imports them as before; a GGUF load does not.

torch._dynamo, its ``_trace_wrapped_higher_order_op`` and the symbolic-shapes
module are stand-in modules (DEFERRED) while MODULES import, and
``torch.compiler.disable`` / ``allow_in_graph`` stand-in functions (COMPILER):
- the classes and functions imported from them are lazy stand-ins that import
  the real module on first use; the exception class is a plain RuntimeError of
  the same name (raised only where torch traces symbolic shapes, which llmhost
  never does);
- ``disable`` wraps the function so that it calls the real
  ``torch._dynamo.disable`` once the real torch._dynamo is loaded (only
  torch.compile can be running then) and the function itself before;
  ``assume_constant_result`` sets the same mark as the real one;
  ``allow_in_graph`` returns the function as it is (a hint for torch.compile,
  which llmhost never runs);
- any other name asked of a stand-in module drops the stand-ins and imports
  the real module: a newer transformers costs memory, never a failed load.
Afterwards the real modules import as usual (tests/test_memory.py compiles a
function). models/gguf.py skips torch's initializers, whose meta-device
versions import torch._dynamo on first call; transformers' ``from_pretrained``
still runs them, so a load of a model folder imports it.

On a machine without CUDA or XPU, torch's ``has_triton_package()`` answers
False, which is the truth there for what torch uses it for (inductor's CPU
backend compiles C++, not triton); on a GPU machine nothing changes. boto3
looks absent while those modules import (``sys.modules["boto3"] = None``:
``find_spec`` answers None), and the SageMaker prompts get a lazy stand-in
module that imports it on first use.

Nothing else is patched, and nothing at all when transformers' modeling code
was already imported.
"""
from __future__ import annotations

import sys
import threading
import types

_lock = threading.Lock()
_done = False

HIDDEN = ("is_torchao_available", "is_scipy_available", "is_kernels_available",
          "is_torch_distributed_available")
# the check whose skipped blocks run on the first use of a name they bind (_SkippedMeta)
DISTRIBUTED = "is_torch_distributed_available"
# the transformers modules that import torchao / scipy / kernels / torch._dynamo at
# their top (the last two: the model code every load imports)
MODULES = ("transformers.quantizers", "transformers.loss.loss_utils", "transformers.modeling_utils",
           "transformers.generation.utils")


def _lazy(module: str, name: str):
    def stand_in(*args, **kwargs):
        import importlib
        return getattr(importlib.import_module(module), name)(*args, **kwargs)
    stand_in.__name__ = name
    return stand_in


# what a module skipped by a hidden check would have imported, where it uses it
# (hub_kernels defines plain stand-ins of its own)
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


class _Deferred(types.ModuleType):
    """Stands for a module while MODULES import (DEFERRED): the names it was
    given, else the real module (every stand-in dropped first)."""

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)   # (inspect and friends probe every module)
        _drop_deferred()
        import importlib
        return getattr(importlib.import_module(self.__name__), attr)


def _drop_deferred() -> None:
    for name in DEFERRED:
        if isinstance(sys.modules.get(name), _Deferred):
            del sys.modules[name]


def _dynamo_loaded() -> bool:
    module = sys.modules.get("torch._dynamo")
    return module is not None and not isinstance(module, _Deferred)


def _disable(fn=None, recursive=True, *, reason=None):
    """torch.compiler.disable's stand-in: the real one once torch._dynamo is
    loaded (torch.compile needs it), the function itself before."""
    if fn is None:
        return lambda f: _disable(f, recursive, reason=reason)
    import functools

    real = []

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if not _dynamo_loaded():
            return fn(*args, **kwargs)
        if not real:
            import torch
            real.append(torch._dynamo.disable(fn, recursive, reason=reason))
        return real[0](*args, **kwargs)
    return call


def _mark_constant(fn):
    fn._dynamo_marked_constant = True   # what torch._dynamo.assume_constant_result does
    return fn


def _as_is(fn):
    return fn


# stand-in modules while MODULES import, and the names they answer
DEFERRED = {
    "torch._dynamo": {"assume_constant_result": _mark_constant, "allow_in_graph": _as_is,
                      "disable": _disable},
    "torch._dynamo._trace_wrapped_higher_order_op": {
        "TransformGetItemToIndex": _lazy("torch._dynamo._trace_wrapped_higher_order_op",
                                         "TransformGetItemToIndex")},
    # sympy's module (torch.distributed.tensor's ops import three names from it)
    "torch.fx.experimental.symbolic_shapes": {
        "guard_or_false": _lazy("torch.fx.experimental.symbolic_shapes", "guard_or_false"),
        "statically_known_true": _lazy("torch.fx.experimental.symbolic_shapes", "statically_known_true"),
        "GuardOnDataDependentSymNode": type("GuardOnDataDependentSymNode", (RuntimeError,), {})},
}
# torch.compiler's functions that import torch._dynamo, while MODULES import
COMPILER = {"disable": _disable, "allow_in_graph": _as_is}


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

        import torch.compiler

        real = {name: getattr(iu, name) for name in HIDDEN}
        fake = {name: (lambda *a, **k: False) for name in HIDDEN}
        compiler = {name: getattr(torch.compiler, name) for name in COMPILER}
        before = set(sys.modules)
        absent = [name for name in ABSENT if name not in sys.modules]
        for name in absent:
            sys.modules[name] = None
        for module, names in DEFERRED.items():
            if module not in sys.modules:
                sys.modules[module] = _Deferred(module)
                sys.modules[module].__dict__.update(names, __path__=[])
        if isinstance(sys.modules["torch._dynamo"], _Deferred):
            for name, stand_in in COMPILER.items():
                setattr(torch.compiler, name, stand_in)
        for name in HIDDEN:
            setattr(tu, name, fake[name])
            setattr(iu, name, fake[name])
        try:
            for module in MODULES:
                importlib.import_module(module)
        finally:
            _drop_deferred()
            for name, function in compiler.items():
                setattr(torch.compiler, name, function)
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
                        if name in LAZY:
                            _give_stand_in(namespace, LAZY[name])
                for name in absent:
                    _give_stand_in(namespace, _LazyModule(name), f"import {name}")
                if namespace.get(DISTRIBUTED) is real[DISTRIBUTED]:
                    _defer_blocks(namespace)


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


# {module: (its namespace, its skipped `if is_torch_distributed_available():` blocks, the
# modules those blocks import from)}
_skipped: dict[str, tuple[dict, list, set]] = {}
_realize_lock = threading.RLock()
_realized = False


def _distributed_blocks(tree) -> list:
    """The module's top-level ``if is_torch_distributed_available():`` statements."""
    import ast
    return [node for node in tree.body if isinstance(node, ast.If) and isinstance(node.test, ast.Call)
            and isinstance(node.test.func, ast.Name) and node.test.func.id == DISTRIBUTED
            and not node.test.args]


def _bound(statements, package: str):
    """(name, the module it comes from or None, the attribute or None) for each name
    `statements` bind at their level (through ifs and trys, not into functions)."""
    import ast
    import importlib.util
    for st in statements:
        if isinstance(st, ast.Import):
            for alias in st.names:
                yield (alias.asname, alias.name, None) if alias.asname else \
                    (alias.name.split(".")[0], alias.name.split(".")[0], None)
        elif isinstance(st, ast.ImportFrom):
            module = importlib.util.resolve_name("." * st.level + (st.module or ""), package) \
                if st.level else st.module
            for alias in st.names:
                yield alias.asname or alias.name, module, alias.name
        elif isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield st.name, None, None
        elif isinstance(st, ast.Assign):
            for target in st.targets:
                if isinstance(target, ast.Name):
                    yield target.id, None, None
        elif isinstance(st, ast.If):
            yield from _bound(st.body + st.orelse, package)
        elif isinstance(st, ast.Try):
            yield from _bound(st.body + st.orelse + st.finalbody
                              + [s for h in st.handlers for s in h.body], package)


def _defer_blocks(namespace: dict) -> None:
    """A module imported while the distributed check answered False: each name its
    skipped blocks bind is what they would bind where that costs nothing (a module,
    or a name of a module, already imported), else a _SkippedMeta stand-in."""
    import ast
    path = namespace.get("__file__")
    if not str(path).endswith(".py"):
        return
    with open(path, encoding="utf-8") as fh:
        blocks = _distributed_blocks(ast.parse(fh.read(), path))
    if not blocks:
        return
    bound = list(_bound([s for b in blocks for s in b.body], namespace.get("__package__") or ""))
    _skipped[namespace["__name__"]] = namespace, blocks, {module for _, module, _ in bound if module}
    for name, module, attr in bound:
        if name in namespace:
            continue
        loaded = sys.modules.get(module) if module else None
        if loaded is not None and (attr is None or hasattr(loaded, attr)):
            namespace[name] = getattr(loaded, attr) if attr else loaded
        else:
            namespace[name] = _SkippedMeta(name, (), {"_namespace": namespace, "_source": module})


def _realize() -> None:
    """Run every skipped block once, in the modules' namespaces (a module's after
    those of the modules its blocks import from): as the imports would have."""
    import ast
    global _realized
    with _realize_lock:
        if _realized:
            return
        _realized = True
        order, seen = [], set()

        def visit(name: str) -> None:
            if name in seen or name not in _skipped:
                return
            seen.add(name)
            for module in _skipped[name][2]:
                visit(module)
            order.append(name)

        for name in list(_skipped):
            visit(name)
        for name in order:
            namespace, blocks, _ = _skipped[name]
            body = [ast.If(test=b.test, body=b.body, orelse=[]) for b in blocks]
            exec(compile(ast.fix_missing_locations(ast.Module(body=body, type_ignores=[])),
                         namespace["__file__"], "exec"), namespace)


class _SkippedMeta(type):
    """Stands for a name a skipped ``if is_torch_distributed_available():`` block
    binds (a class, function or import of transformers' tensor-parallel and FSDP
    code): its first use runs the skipped blocks (``_realize``), then it is the
    real object. An instance check against a class of a module never imported
    answers False without importing it: no object can be one."""

    def _real(cls):
        _realize()
        value = cls._namespace[cls.__name__]
        if isinstance(value, _SkippedMeta):
            raise NameError(f"name {cls.__name__!r} is not defined (torch.distributed is unavailable)")
        return value

    def __call__(cls, *args, **kwargs):
        return cls._real()(*args, **kwargs)

    def __getattr__(cls, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return getattr(cls._real(), attr)

    def __instancecheck__(cls, obj) -> bool:
        if cls._source is not None and cls._source not in sys.modules:
            return False
        return isinstance(obj, cls._real())

    def __subclasscheck__(cls, other) -> bool:
        if cls._source is not None and cls._source not in sys.modules:
            return False
        return issubclass(other, cls._real())
