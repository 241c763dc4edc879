"""Work around a Triton 3.x interpreter bug with NumPy ≥ 2.4 (``TRITON_INTERPRET=1`` only).

The interpreter holds every scalar as a one-element NumPy array and converts it for ``range``
with ``int(array)``; NumPy 2.4 turned that deprecated conversion of 1-D arrays into a
``TypeError``, so any loop with a run-time bound fails in the interpreter. We re-define the
tensor ``__index__`` hook the interpreter installs to read the single element instead. Compiled
(GPU) kernels are unaffected; nothing is patched unless the interpreter is active.
"""

from __future__ import annotations

from typing import Any


def apply() -> None:
    try:
        import numpy as np
        from triton.runtime import interpreter
    except ImportError:  # pragma: no cover
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_adaattn_patched", False):
        return

    def _patched(tensor: Any, scope: Any) -> None:
        original(tensor, scope)
        scope.set_attr(
            tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0])
        )

    _patched._adaattn_patched = True  # type: ignore[attr-defined]
    interpreter._patch_lang_tensor = _patched
