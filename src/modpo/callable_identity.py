"""What decides a Python function's output, as a cache key: its code, the helpers it calls and the values it holds.

`function_identity(fn)` is content only, the same in every process for the same behaviour:

* the function's source (its compiled code where there is none, e.g. defined by `exec`);
* each function or class of its own package that it reads from its globals (`co_names` resolved in
  `fn.__globals__`), transitively: editing a helper it calls changes the key;
* what it captured (closure cells, defaults), each by `content_form`: numbers, text, containers, tensors and
  arrays by their bytes, functions by their own identity. A value without such a form (an object whose `repr`
  holds a memory address) has no stable key: `NoContentForm` says which.

Global *values* it reads (a module-level number or list) are not part of the key: `unkeyed_state` names them,
and the caller asks for an explicit version instead.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import types
from collections.abc import Callable

import numpy as np
import torch


class NoContentForm(TypeError):
    """A value a function depends on has no content form to key a cache with."""


def _global_names(code) -> list[str]:
    """Names a code object (and the functions nested in it) may read from its globals."""
    names = list(code.co_names)
    for constant in code.co_consts:
        if inspect.iscode(constant):
            names += _global_names(constant)
    return list(dict.fromkeys(names))


def _package(obj) -> str:
    return (getattr(obj, "__module__", None) or "").split(".")[0]


def unkeyed_state(fn: Callable) -> str | None:
    """Why the source code and captured values of `fn` do not decide what it returns, or None when they do."""
    if inspect.ismethod(fn):
        return "it is a bound method, and its instance's state is not part of the cache key"
    if not inspect.isfunction(fn):
        return f"it is a callable {type(fn).__name__} object, and its state is not part of the cache key"
    values = [name for f in [fn, *_helper_functions(fn)] for name in _global_names(f.__code__) if name in f.__globals__
              and not (inspect.ismodule(f.__globals__[name]) or inspect.isclass(f.__globals__[name])
                       or inspect.isroutine(f.__globals__[name]))]
    if values:
        return f"it reads the global value(s) {', '.join(values)}, which are not part of the cache key"
    return None


def _code_form(code) -> list:
    """Compiled code without addresses: bytecode, names and constants (nested code objects likewise)."""
    consts = [_code_form(c) if inspect.iscode(c) else repr(c) for c in code.co_consts]
    return [code.co_code.hex(), list(code.co_names), consts]


def source_of(obj) -> str:
    """The source of a function or class, else (defined without a file) its compiled code."""
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):
        code = getattr(obj, "__code__", None)
        return repr(_code_form(code)) if code is not None else getattr(obj, "__qualname__", type(obj).__name__)


def _digest(text: str) -> str:
    return _bytes_digest(text.encode())


def _bytes_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _helpers(fn: types.FunctionType) -> dict[str, object]:
    """Every function and class of `fn`'s own package it reads from its globals, transitively, by qualified name.
    Those of other packages (the standard library, torch) are not followed."""
    found: dict[str, object] = {}
    pending = [fn]
    while pending:
        current = pending.pop()
        for name in _global_names(current.__code__):
            value = current.__globals__.get(name)
            if not (inspect.isfunction(value) or inspect.isclass(value)) or _package(value) != _package(fn):
                continue
            key = f"{value.__module__}.{value.__qualname__}"
            if key in found or value is fn:
                continue
            found[key] = value
            if inspect.isfunction(value):
                pending.append(value)
    return dict(sorted(found.items()))


def _helper_functions(fn: types.FunctionType) -> list[types.FunctionType]:
    return [value for value in _helpers(fn).values() if inspect.isfunction(value)]


def helpers(fn: types.FunctionType) -> dict[str, str]:
    """{qualified name: digest of its source} of the helpers `fn` calls from its own package (see `_helpers`)."""
    return {name: _digest(source_of(value)) for name, value in _helpers(fn).items()}


def content_form(value, seen: frozenset = frozenset()):
    """A JSON-able form of `value` that is the same for equal content in every process; NoContentForm if none."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return repr(value)  # exact, and nan/inf as text
    if isinstance(value, bytes):
        return {"bytes": _bytes_digest(value)}
    if isinstance(value, (list, tuple)):
        return {type(value).__name__: [content_form(v, seen) for v in value]}
    if isinstance(value, (set, frozenset)):
        return {"set": sorted(repr(content_form(v, seen)) for v in value)}
    if isinstance(value, dict):
        return {"dict": sorted((repr(content_form(k, seen)), content_form(v, seen)) for k, v in value.items())}
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().contiguous()
        data = value.reshape(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b""
        return {"tensor": [str(value.dtype), list(value.shape), _bytes_digest(data)]}
    if isinstance(value, np.ndarray):
        return {"array": [str(value.dtype), list(value.shape), _bytes_digest(np.ascontiguousarray(value).tobytes())]}
    if inspect.isfunction(value):
        if id(value) in seen:
            return {"function": value.__qualname__}
        return {"function": function_identity(value, seen | {id(value)})}
    if inspect.ismodule(value):
        return {"module": value.__name__}
    if inspect.isclass(value) or inspect.isbuiltin(value):
        return {"name": f"{value.__module__}.{value.__qualname__}"}
    if dataclasses.is_dataclass(value):
        return {type(value).__qualname__: {f.name: content_form(getattr(value, f.name), seen)
                                           for f in dataclasses.fields(value)}}
    raise NoContentForm(f"it holds a {type(value).__name__} value, which has no stable content form")


def function_identity(fn: types.FunctionType, seen: frozenset = frozenset()) -> dict:
    """The content of a plain function (see the module's docstring): its code, its package's helpers it calls
    and what it captured. NoContentForm when a captured value has no content form."""
    seen = seen | {id(fn)}
    captured = [content_form(cell.cell_contents, seen) for cell in (fn.__closure__ or ())]
    captured.append(content_form(fn.__defaults__, seen))
    captured.append(content_form(fn.__kwdefaults__, seen))
    return {"code": _digest(source_of(fn)), "helpers": helpers(fn), "captured": _digest(repr(captured))}
