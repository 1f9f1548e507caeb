"""Where in the model's own code an export failed: "asteroid/masknn/norms.py:14".

torch.export's errors (GuardOnDataDependentSymNode, ...) are raised deep inside torch; the
line worth naming is the innermost frame of the model's code (the user's module or the
package it comes from), which the one-line message otherwise hides without --debug.
"""

from __future__ import annotations

import os
import sys
import sysconfig
import traceback

# Frames of these packages are the machinery, never the model's line.
_MACHINERY = frozenset({"torch", "onnxscript", "onnx_ir", "onnx", "rnnedge", "functorch",
                        "sympy", "typing_extensions"})


def _stdlib_dirs() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    return tuple(os.path.realpath(paths[k]) + os.sep for k in ("stdlib", "platstdlib")
                 if paths.get(k))


def _is_model_code(frame) -> bool:
    filename = frame.f_code.co_filename
    if not filename or filename.startswith("<"):  # generated code: "<string>", "<eval_with_key>"
        return False
    module = str(frame.f_globals.get("__name__") or "")
    if module.split(".")[0] in _MACHINERY:
        return False
    real = os.path.realpath(filename)
    site = ("site-packages" + os.sep, "dist-packages" + os.sep)
    # The standard library (contextlib, functools) sits between torch's own frames.
    return not (real.startswith(_stdlib_dirs()) and not any(s in real for s in site))


def _shown(filename: str) -> str:
    """The path as the user would name it: below its sys.path entry (the package's own
    path, e.g. asteroid/masknn/norms.py), else below the working directory, else as is."""
    real = os.path.realpath(filename)
    roots = [os.path.realpath(p or os.getcwd()) for p in sys.path]
    roots.append(os.path.realpath(os.getcwd()))
    below = [os.path.relpath(real, r) for r in roots if real.startswith(r.rstrip(os.sep) + os.sep)]
    return min(below, key=len) if below else filename


def model_frame(chain: list[BaseException]) -> str | None:
    """"path:line" of the innermost frame of the model's code in an exception chain
    (``chain[0]`` the outermost exception, as ``__cause__``/``__context__`` lead), or None
    when every frame is torch's, onnx's, rnnedge's or the standard library's."""
    for exc in reversed(chain):  # the root first: its traceback reaches deepest
        frames = list(traceback.walk_tb(exc.__traceback__))
        for frame, line in reversed(frames):
            if _is_model_code(frame):
                return f"{_shown(frame.f_code.co_filename)}:{line}"
    return None
