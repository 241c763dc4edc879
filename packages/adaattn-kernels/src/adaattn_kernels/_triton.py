"""Where the Triton kernels can run: CUDA tensors, or CPU tensors under the Triton interpreter."""

from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Any

import torch


def interpreting() -> bool:
    """Whether Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_installed() -> bool:
    """Whether the ``triton`` package can be imported (it is not imported here).

    Looked up once at import: ``torch.compile`` cannot trace ``importlib.util.find_spec``.
    """
    return _TRITON_INSTALLED


def runs_triton(t: torch.Tensor) -> bool:
    """Whether a Triton kernel can take ``t``: on CUDA, or on CPU under the interpreter."""
    return t.is_cuda or (t.device.type == "cpu" and interpreting())


def eager_inference(*tensors: torch.Tensor) -> bool:
    """Whether a kernel call may skip its custom op and launch directly.

    True outside ``torch.compile`` tracing when no input needs a gradient. The custom ops exist
    for autograd and for tracing; their dispatch costs ~25 us of host time per call, as much as
    the whole GPU work of a short launch, so eager inference goes around them.
    """
    if torch.compiler.is_compiling():
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def device_ctx(t: torch.Tensor) -> contextlib.AbstractContextManager[Any]:
    """Make ``t``'s GPU current for a launch (Triton launches on the current device).

    A no-op for CPU tensors and when ``t``'s GPU is already current, which saves the two device
    switches of ``torch.cuda.device`` on every call.
    """
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def graph_bench(kernel_call: Any, quantiles: Any) -> Any:
    """Autotuner timing by CUDA-graph replay: the GPU time of each candidate alone.

    Triton's default (``triton.testing.do_bench``) times eager launches; where a candidate runs
    shorter on the GPU than its launch takes on the host (the hybrid kernel at 8k keys takes
    ~0.1 ms against ~0.1–0.2 ms of Python), every candidate measures the host and the choice
    is noise. Pass as ``triton.autotune(..., do_bench=graph_bench)``.
    """
    from triton.testing import do_bench_cudagraph

    # do_bench_cudagraph times on a stream of its own: let the caller's pending work (the
    # inputs of this very launch) finish first.
    torch.cuda.current_stream().synchronize()
    return do_bench_cudagraph(kernel_call, rep=20, quantiles=quantiles)


def set_replay(enabled: bool) -> None:
    """Turn replay of compiled kernels on or off for every :class:`KernelLauncher` (benchmarks).

    Off, each launch goes through Triton's own ``kernel[grid](...)`` path. Has no effect under
    the interpreter, where replay is always off.
    """
    for launcher in _LAUNCHERS:
        launcher.enabled = enabled and not interpreting()


def clear_replays() -> None:
    """Forget every recorded launch, so the next call of each key goes through Triton again.

    For tools that change an autotuner's candidate configs or cached choice between calls.
    """
    for launcher in _LAUNCHERS:
        launcher._cache.clear()


#: A replayable launch: compiled kernel, the constexprs and config by name (what grid callables
#: read), their values in parameter order, the config's pre-hook.
_Replay = tuple[Any, dict[str, Any], tuple[Any, ...], Any]


_LAUNCHERS: list[KernelLauncher] = []


class KernelLauncher:
    """Launches a Triton kernel and replays its compiled binary on later calls alike.

    Every ``kernel[grid](*args)`` call makes Triton bind all arguments, compute the kernel's
    specialisation (dtype and 16-byte alignment of each pointer, ``== 1`` / ``% 16`` of each
    integer), look up the compiled binary, and, through :class:`triton.runtime.Autotuner`,
    rebuild the tuning key. For kernels with 30-odd arguments this host work takes longer than a
    short attention launch runs on the GPU. This wrapper keys a call on the values that decide
    all of that — each integer argument and constexpr keyword, each tensor's dtype and 16-byte
    alignment, the device — and on a repeat hands the arguments straight to the launcher of the
    binary Triton returned the first time (what ``JITFunction.run`` ends with), with the config
    the autotuner chose then. The grid is evaluated on every call (a callable grid sees the
    constexprs and the config, which is all this package's grids read) and the config's pre-hook
    runs before each launch. Floats are keyed by value (a changed score scale records a new key).
    Skipped on a replay: Triton's check that the kernel's global constants have not changed
    since compilation, and JIT pre-run hooks (this package's kernels use neither).

    The first call of each key, calls under the interpreter and calls while a Triton launch hook
    is set (profilers such as proton) go through Triton as usual. ``ADAATTN_TRITON_REPLAY=0``
    turns replay off; :func:`set_replay` switches it for every launcher.

    Args:
        kernel: A ``@triton.jit`` function, optionally wrapped by ``@triton.autotune``.
        max_entries: Keys kept before the cache is cleared (one per shape and plan kind).
    """

    def __init__(self, kernel: Any, max_entries: int = 256) -> None:
        self.kernel = kernel
        # JITFunction and Autotuner both list every parameter, constexprs included, in order.
        self._arg_names: list[str] = list(getattr(kernel, "arg_names", ()))
        self._autotuned = hasattr(kernel, "configs")
        self._max_entries = max_entries
        #: Whether repeats are replayed (read once from the environment; tests may set it).
        self.enabled = not interpreting() and os.environ.get("ADAATTN_TRITON_REPLAY") != "0"
        self._cache: dict[tuple[Any, ...], _Replay] = {}
        self.replays = 0
        from triton import knobs

        self._knobs = knobs
        self._stream: Any = None  # Triton's current-stream getter, bound at the first record
        _LAUNCHERS.append(self)

    @staticmethod
    def _key(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...] | None:
        key: list[Any] = []
        for a in args:
            t = type(a)
            if t is int or a is None:
                key.append(a)
            elif t is float:
                key.append((float, a))  # by value: a float constexpr is baked into the binary
            elif isinstance(a, torch.Tensor):
                key.append((a.dtype, a.data_ptr() % 16 == 0))
            elif t is bool:
                key.append((bool, a))
            elif hasattr(a, "block_shape") and isinstance(getattr(a, "base", None), torch.Tensor):
                # A host-side TMA descriptor (triton.tools.tensor_descriptor.TensorDescriptor).
                b = a.base
                key.append((t, b.dtype, b.data_ptr() % 16 == 0, tuple(a.shape), tuple(a.strides),
                            tuple(a.block_shape), getattr(a, "padding", None)))  # fmt: skip
            else:
                return None  # anything else: leave it to Triton
        key.append(tuple((k, type(v), v) for k, v in kwargs.items()))
        return tuple(key)

    def _record(
        self, compiled: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> _Replay | None:
        if compiled is None or getattr(compiled, "function", None) is None:
            return None
        constants = getattr(getattr(compiled, "src", None), "constants", None)
        if not isinstance(constants, dict):
            return None
        if self._stream is None:
            from triton.runtime import driver

            self._stream = driver.active.get_current_stream  # what Triton launches on
        # Constexprs come from the binary itself (not from the autotuner's best_config, which
        # another thread's launch may have changed since).
        names = self._arg_names[len(args) :]
        meta: dict[str, Any] = {}
        for i, name in enumerate(names, start=len(args)):
            if name in kwargs:
                meta[name] = kwargs[name]
            elif (i,) in constants:
                meta[name] = constants[(i,)]
            else:
                return None  # a defaulted or unknown parameter: leave it to Triton
        pre_hook = None
        if self._autotuned:
            config = self._config_of(compiled, meta)
            if config is None:
                return None
            pre_hook = config.pre_hook
        return compiled, meta, tuple(meta[name] for name in names), pre_hook

    def _config_of(self, compiled: Any, meta: dict[str, Any]) -> Any:
        """The autotuner config this binary was compiled for (its tile values and warps)."""
        md = compiled.metadata
        for config in (*self.kernel.configs, getattr(self.kernel, "best_config", None)):
            if (
                config is not None
                and config.num_warps == md.num_warps
                and config.num_stages == md.num_stages
                and all(meta.get(k) == v for k, v in config.kwargs.items())
            ):
                return config
        return None

    def __call__(self, grid: Any, *args: Any, **kwargs: Any) -> None:
        """``kernel[grid](*args, **kwargs)``, replayed when this call's key was seen before."""
        if not self.enabled or not self._arg_names or _launch_hooked(self._knobs):
            self.kernel[grid](*args, **kwargs)
            return
        key = self._key(args, kwargs)
        if key is None:
            self.kernel[grid](*args, **kwargs)
            return
        device = torch.cuda.current_device()
        key = (device, *key)
        entry = self._cache.get(key)
        if entry is not None:
            compiled, meta, tail, pre_hook = entry
            # The grid is evaluated on every call: it may depend on values outside the key (the
            # length of a head list, say). Grid callables see the constexprs and the config.
            g = grid(meta) if callable(grid) else grid
            if pre_hook is not None:  # as the autotuner calls it before every launch
                pre_hook(dict(zip(self._arg_names, (*args, *tail))))
            # What Triton's JITFunction.run does once the binary is found, with no launch hooks.
            compiled.run(
                g[0], g[1] if len(g) > 1 else 1, g[2] if len(g) > 2 else 1,
                self._stream(device), compiled.function, compiled.packed_metadata,
                None, None, None, *args, *tail,
            )  # fmt: skip
            self.replays += 1
            return
        compiled = self.kernel[grid](*args, **kwargs)
        recorded = self._record(compiled, args, kwargs)
        if recorded is not None:
            if len(self._cache) >= self._max_entries:
                self._cache.clear()
            self._cache[key] = recorded


def _launch_hooked(knobs: Any) -> bool:
    """Whether a Triton launch hook (e.g. the proton profiler) wants to see every launch.

    Triton >= 3.6 (this package's floor) keeps the hooks in ``HookChain`` lists, never ``None``.
    """
    return bool(knobs.runtime.launch_enter_hook.calls or knobs.runtime.launch_exit_hook.calls)
