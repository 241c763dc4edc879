r"""Context-parallel ring attention over :mod:`torch.distributed`.

Every rank of a process group holds one shard of a long sequence — its own queries, keys and
values, ``(B, H, S_local, D)`` — and computes the exact attention output of its queries over the
*whole* sequence without ever holding the whole sequence. The key/value shards travel around the
ring of ranks (Liu, Zaharia & Abbeel 2023, "Ring Attention with Blockwise Transformers for
Near-Infinite Context", arXiv 2310.01889): at step ``t`` rank ``r`` holds the shard of rank
``r − t``, posts the point-to-point transfer of that shard to rank ``r + 1`` *before* computing
on it, so communication overlaps compute, and folds the block's partial result into its running
output through the log-sum-exp the kernels return. For two disjoint key sets ``A`` and ``B``

.. math::

    \ell = \log\!\left(e^{\ell_A} + e^{\ell_B}\right), \qquad
    O = e^{\ell_A - \ell}\, O_A + e^{\ell_B - \ell}\, O_B,

which is exact (the online softmax of Milakov & Gimelshein 2018, arXiv 1805.02867, applied to
whole blocks; :func:`adaattn_kernels.merge_attention_states_` does it in one fused pass, in
place). The backward pass rotates the key/value shards again; the other ranks' ``dK``/``dV``
contributions to a shard travel with it from its first visitor and reach home after ``W − 1``
hops, while the own block's contribution never leaves. Every block's gradient is computed from
the *global* log-sum-exp, so the blocks' probabilities are the global softmax's.

Transfers. Each step's transfer is one NCCL message per tensor, posted before the step's
compute. By default (``comm_priority="high"``) they run on high-priority NCCL streams, so the
transfer's few blocks are scheduled beside the attention kernel instead of queueing behind its
thousands. The first forward and the first backward of each call signature run their transfers
unoverlapped, so that the Triton autotuner times the block kernels alone.

Causal load balance. With the ``"contiguous"`` layout rank ``r`` holds the ``r``-th of ``W``
equal chunks, and causal attention gives the last rank ``W`` times the work of the first. The
default ``"zigzag"`` layout splits the sequence into ``2W`` chunks and gives rank ``r`` chunks
``r`` and ``2W − 1 − r`` (the context-parallel split of Llama 3, Dubey et al. 2024, arXiv
2407.21783, §3.3.2): every rank then does the same work — one causal block of its own shard,
and half a block (its later chunk against the other shard's earlier chunk, or the reverse) at
every other step. Blocks entirely above the diagonal are skipped, never computed and masked.

Each block runs :func:`adaattn_kernels.attention` (the fused Triton kernel on CUDA, the PyTorch
reference elsewhere), and the backward runs the kernels' ``adaattn::flash_attention_backward``
op (or the reference maths where the forward ran the reference).

Example:
    Under ``torchrun --nproc-per-node 2 script.py`` (gloo on CPU, NCCL on CUDA)::

        import torch, torch.distributed as dist
        from adaattn.distributed import ring_attention, shard_sequence, unshard_sequence

        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        torch.manual_seed(0)  # the same full tensors on every rank, for the example
        q, k, v = torch.randn(3, 1, 8, 4096, 64).unbind(0)
        q_l, k_l, v_l = (shard_sequence(t, rank, world) for t in (q, k, v))
        out_l = ring_attention(q_l, k_l, v_l, causal=True)
        out = unshard_sequence(out_l)  # the full (1, 8, 4096, 64) output on every rank
"""

from __future__ import annotations

import math
import os
import zlib
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from adaattn_kernels import HybridPlan

__all__ = ["LAYOUTS", "Layout", "ring_attention", "shard_sequence", "unshard_sequence"]

#: How a sequence is split over the ranks of a group (see :func:`shard_sequence`).
Layout = Literal["zigzag", "contiguous"]
#: The accepted values of ``layout``.
LAYOUTS: tuple[str, ...] = ("zigzag", "contiguous")

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TAG_KV, _TAG_DKV = 0, 1  # gloo matches messages by tag; NCCL orders them (same order on all ranks)


# ---------------------------------------------------------------------------------------------
# Sharding helpers
# ---------------------------------------------------------------------------------------------


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"`layout` must be one of {LAYOUTS}, got {layout!r}")


def _check_dim(x: torch.Tensor, dim: int) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"`dim` must be an int, got {type(dim).__name__}")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(
            f"`dim` {dim} is out of range for a {x.dim()}-D tensor of shape {tuple(x.shape)}"
        )
    return dim % x.dim()


def shard_sequence(
    x: torch.Tensor,
    rank: int,
    world: int,
    *,
    layout: Layout = "zigzag",
    dim: int = 2,
) -> torch.Tensor:
    """The shard of a full sequence that rank ``rank`` of ``world`` ranks holds.

    ``"contiguous"``: the sequence is cut into ``world`` equal chunks and rank ``r`` holds chunk
    ``r`` (a view of ``x``). ``"zigzag"``: it is cut into ``2·world`` equal chunks and rank ``r``
    holds chunks ``r`` and ``2·world − 1 − r``, concatenated in that order (a new tensor), which
    balances causal attention over the ranks. Differentiable; no communication.

    Args:
        x: The full tensor, e.g. ``(B, H, S, D)`` queries, keys or values.
        rank: This process's rank in the group, ``0 ≤ rank < world``.
        world: Number of ranks the sequence is split over (``torch.distributed``'s world size
            of the group).
        layout: ``"zigzag"`` (default) or ``"contiguous"``.
        dim: The sequence dimension of ``x`` (default 2, as in ``(B, H, S, D)``).

    Returns:
        The local shard, ``x.shape[dim] // world`` long along ``dim``.

    Raises:
        TypeError: ``x`` is not a tensor, or ``rank`` / ``world`` / ``dim`` are not ints.
        ValueError: ``rank`` or ``dim`` out of range, an unknown ``layout``, or a sequence length
            that is not a multiple of ``world`` (``2·world`` for ``"zigzag"``).

    Example:
        >>> import torch
        >>> from adaattn.distributed import shard_sequence
        >>> x = torch.arange(8).view(1, 1, 8, 1)
        >>> shard_sequence(x, 0, 2).flatten().tolist()
        [0, 1, 6, 7]
        >>> shard_sequence(x, 1, 2, layout="contiguous").flatten().tolist()
        [4, 5, 6, 7]
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"`x` must be a torch.Tensor, got {type(x).__name__}")
    for name, value in (("rank", rank), ("world", world)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"`{name}` must be an int, got {type(value).__name__}")
    if world < 1:
        raise ValueError(f"`world` must be ≥ 1, got {world}")
    if not 0 <= rank < world:
        raise ValueError(f"`rank` must be in [0, {world}) for world {world}, got {rank}")
    _check_layout(layout)
    dim = _check_dim(x, dim)
    n = x.shape[dim]
    parts = world if layout == "contiguous" else 2 * world
    if n % parts != 0:
        raise ValueError(
            f"the sequence length {n} (dim {dim} of `x`) is not a multiple of {parts} "
            f"({'world' if layout == 'contiguous' else '2·world'} for layout={layout!r}); pad "
            "the sequence to a multiple of it"
        )
    chunk = n // parts
    if layout == "contiguous":
        return x.narrow(dim, rank * chunk, chunk)
    return torch.cat(
        (x.narrow(dim, rank * chunk, chunk), x.narrow(dim, (parts - 1 - rank) * chunk, chunk)),
        dim=dim,
    )


def _merge_shards(shards: list[torch.Tensor], layout: str, dim: int) -> torch.Tensor:
    """Inverse of :func:`shard_sequence`: the full tensor from every rank's shard, in rank order."""
    if layout == "contiguous":
        return torch.cat(shards, dim=dim)
    half = shards[0].shape[dim] // 2
    first = [s.narrow(dim, 0, half) for s in shards]
    second = [s.narrow(dim, half, half) for s in reversed(shards)]
    return torch.cat(first + second, dim=dim)


def unshard_sequence(
    x: torch.Tensor,
    *,
    layout: Layout = "zigzag",
    dim: int = 2,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Gather every rank's shard and return the full sequence, on every rank of ``group``.

    The inverse of :func:`shard_sequence`; one ``all_gather`` over ``group``, which every rank
    of the group must call with shards of the same shape. The result carries no autograd history
    (it is meant for outputs, checks and logging, not for the training graph).

    Args:
        x: This rank's shard, as :func:`shard_sequence` cut it.
        layout: The layout the shards were cut with: ``"zigzag"`` (default) or ``"contiguous"``.
        dim: The sequence dimension (default 2).
        group: The process group; default the world group.

    Returns:
        The full tensor, ``world`` times longer than ``x`` along ``dim``.

    Raises:
        RuntimeError: ``torch.distributed`` is not initialised.
        TypeError: ``x`` is not a tensor.
        ValueError: an unknown ``layout``, ``dim`` out of range, or an odd shard length with
            ``"zigzag"`` (a zig-zag shard is two equal chunks).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"`x` must be a torch.Tensor, got {type(x).__name__}")
    _check_layout(layout)
    dim = _check_dim(x, dim)
    _check_initialized("unshard_sequence")
    if layout == "zigzag" and x.shape[dim] % 2 != 0:
        raise ValueError(
            f"a zig-zag shard holds two equal chunks, but `x` has odd length {x.shape[dim]} "
            f"along dim {dim}; pass the layout the shards were cut with"
        )
    world = dist.get_world_size(group)
    local = x.detach().contiguous()
    shards = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(shards, local, group=group)
    return _merge_shards(shards, layout, dim)


# ---------------------------------------------------------------------------------------------
# The ring
# ---------------------------------------------------------------------------------------------


def _check_initialized(caller: str) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"{caller} needs an initialised torch.distributed process group: call "
            "torch.distributed.init_process_group(...) first (under torchrun, "
            "init_process_group('nccl') on CUDA or ('gloo') on CPU reads the environment)"
        )


@dataclass
class _Pending:
    """In-flight point-to-point work; holds the send buffers until the transfer completes."""

    works: list[Any]
    send: tuple[torch.Tensor, ...]
    received: tuple[torch.Tensor, ...]  # valid once wait() returned

    def wait(self) -> None:
        """Wait for every transfer; later calls return at once (gloo's wait is not idempotent)."""
        for work in self.works:
            work.wait()
        self.works = []


#: Per process group: its high-priority NCCL twin that carries the ring's transfers.
_PRIORITY_TWINS: dict[dist.ProcessGroup, dist.ProcessGroup] = {}


def _transfer_group(
    pg: dist.ProcessGroup, group: dist.ProcessGroup | None, comm_priority: str
) -> dist.ProcessGroup | None:
    """The group whose streams carry the ring's point-to-point transfers.

    NCCL runs a transfer as a kernel on the group's own stream. When that kernel and the
    attention kernel of the same step become ready together, the attention kernel's thousands
    of blocks can take every SM first and the transfer waits for them: it ends up behind the
    step's compute instead of beside it. On a high-priority stream its few blocks are scheduled
    first. With ``comm_priority="high"`` an NCCL group therefore gets a twin over the same ranks
    with high-priority streams (one extra communicator, created on the first call by the group's
    members and kept), unless ``TORCH_NCCL_HIGH_PRIORITY=1`` made every NCCL stream high
    priority already.
    """
    if comm_priority == "group" or dist.get_backend(pg) != "nccl":
        return group
    if os.environ.get("TORCH_NCCL_HIGH_PRIORITY", "0").strip().lower() in ("1", "true", "yes"):
        return group
    twin = _PRIORITY_TWINS.get(pg)
    if twin is None:
        options = dist.ProcessGroupNCCL.Options()
        options.is_high_priority_stream = True
        twin = dist.new_group(
            dist.get_process_group_ranks(pg),
            backend="nccl",
            pg_options=options,
            use_local_synchronization=True,
        )
        assert twin is not None
        _PRIORITY_TWINS[pg] = twin
    return twin


class _Ring:
    """This rank's place in the ring of ``group``: send to the next rank, receive from the last."""

    def __init__(self, group: dist.ProcessGroup | None, comm_priority: str = "group") -> None:
        pg = group if group is not None else dist.group.WORLD
        assert pg is not None
        self.group = group
        self.pg = pg
        self.rank = dist.get_rank(pg)
        if self.rank < 0:
            raise ValueError(
                "this process is not a member of `group`; call ring_attention only on the ranks "
                "of the group (torch.distributed.new_group(ranks))"
            )
        self.world = dist.get_world_size(pg)
        self.next = dist.get_global_rank(pg, (self.rank + 1) % self.world)
        self.prev = dist.get_global_rank(pg, (self.rank - 1) % self.world)
        self.comm_priority = comm_priority
        self._transfer: tuple[dist.ProcessGroup | None] | None = None
        #: False: every transfer completes before the step's compute starts (see _WARM).
        self.overlap = True
        self.signature: tuple[Any, ...] = ()  # the call's key in _CHECKED / _WARM

    @property
    def transfer(self) -> dist.ProcessGroup | None:
        """The group of the transfers; resolved on the first transfer, after every check."""
        if self._transfer is None:
            self._transfer = (_transfer_group(self.pg, self.group, self.comm_priority),)
        return self._transfer[0]

    def exchange(self, send: tuple[torch.Tensor, ...], tag: int) -> _Pending:
        """Post ``send`` to the next rank and receives of the same shapes from the previous one.

        One message per tensor; contiguous tensors (the usual case) travel without a copy.
        """
        send = tuple(t.contiguous() for t in send)
        recv = tuple(torch.empty_like(t) for t in send)
        ops = [dist.P2POp(dist.isend, t, self.next, self.transfer, tag) for t in send]
        ops += [dist.P2POp(dist.irecv, t, self.prev, self.transfer, tag) for t in recv]
        pending = _Pending(list(dist.batch_isend_irecv(ops)), send, recv)
        if not self.overlap:
            pending.wait()
        return pending


@dataclass(frozen=True)
class _Block:
    """The part of one (local queries × visiting key/value shard) block that is computed."""

    rows: slice  # local query positions
    cols: slice  # positions of the key/value shard
    causal: bool  # a diagonal block: top-left causal mask (it is square)


_ALL = slice(None)


def _block(layout: str, causal: bool, rank: int, src: int, length: int) -> _Block | None:
    """What rank ``rank``'s queries compute against the shard of rank ``src`` (None: nothing).

    Zig-zag: rank ``r`` holds chunks ``(r, 2W−1−r)``, so against the shard ``(s, 2W−1−s)`` of
    ``s ≠ r`` exactly half the block is below the diagonal: for ``s < r`` all local queries see
    chunk ``s`` (the shard's first half) and nothing of chunk ``2W−1−s``; for ``s > r`` only the
    later chunk ``2W−1−r`` (the local second half) sees, and sees both chunks of the shard.
    Against its own shard the two chunks are in global order, so plain causal masking is exact.
    """
    if not causal:
        return _Block(_ALL, _ALL, False)
    if src == rank:
        return _Block(_ALL, _ALL, True)
    if layout == "contiguous":
        return _Block(_ALL, _ALL, False) if src < rank else None
    half = length // 2
    if src < rank:
        return _Block(_ALL, slice(0, half), False)
    return _Block(slice(half, None), _ALL, False)


def _seq(t: torch.Tensor, s: slice) -> torch.Tensor:
    """``t[:, :, s]`` (the sequence dimension of ``(B, H, S, ...)``)."""
    return t if s == _ALL else t[:, :, s]


# ---------------------------------------------------------------------------------------------
# Per-block kernels (the calls into adaattn_kernels)
# ---------------------------------------------------------------------------------------------


def _runs_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the blocks run the Triton kernels: the rule of ``attention(backend="auto")``."""
    if q.device.type != "cuda":
        return False
    from adaattn_kernels._validation import check_attention_inputs
    from adaattn_kernels.flash.api import triton_unsupported_reason

    return triton_unsupported_reason(q, check_attention_inputs(q, k, v), None) is None


_BlockFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, bool], tuple[torch.Tensor, torch.Tensor]
]


def _block_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, *, scale: float, triton: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    from adaattn_kernels import attention

    res = attention(
        q,
        k,
        v,
        causal=causal,
        scale=scale,
        return_lse=True,
        backend="triton" if triton else "reference",
    )
    assert isinstance(res, tuple)
    return res


def _fp8_block_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    *,
    scale: float,
    options: Mapping[str, Any],
) -> tuple[torch.Tensor, torch.Tensor]:
    """One block through :func:`adaattn_kernels.fp8.fp8_attention` (its own quantisation)."""
    from adaattn_kernels.fp8 import fp8_attention

    res = fp8_attention(q, k, v, causal=causal, scale=scale, return_lse=True, **options)
    assert isinstance(res, tuple)
    return res


def _block_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dlse: torch.Tensor | None,
    causal: bool,
    scale: float,
    triton: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of one block from the global ``out`` and ``lse``.

    In the inputs' dtype from the Triton kernels, in ``lse.dtype`` from the reference.
    """
    if triton:
        from adaattn_kernels._validation import CAUSAL_NONE, CAUSAL_TOP_LEFT
        from adaattn_kernels.flash.op import flash_attention_backward_op

        mode = CAUSAL_TOP_LEFT if causal else CAUSAL_NONE
        dq, dk, dv = flash_attention_backward_op(do, q, k, v, None, out, lse, dlse, mode, scale)
        return dq, dk, dv
    from adaattn_kernels.flash.naive import attention_backward_reference

    return attention_backward_reference(
        do, q, k, v, out, lse, dlse, causal="top_left" if causal else False, scale=scale
    )


def _acc_dtype(dtype: torch.dtype, world: int) -> torch.dtype:
    """The dtype the ring accumulates outputs and gradients in.

    With two ranks every accumulator takes exactly one addition — the block of the other shard
    — and then goes home to be rounded to the input dtype, so accumulating in the input dtype
    (each addition computed in float32, rounded once) gives the same result as a float32
    accumulator, with half the memory traffic and half the bytes on the wire. More ranks add
    more partial results, each of which would be rounded, so 16-bit inputs accumulate in
    float32 there. (The Triton blocks return the input dtype; the reference backward returns
    float32 gradients, which its ring accumulates in float32.)
    """
    if world <= 2 or dtype in (torch.float32, torch.float64):
        return dtype
    return torch.float32


def _ring_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float,
    layout: str,
    ring: _Ring,
    triton: bool,
    block_fn: _BlockFn | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward ring; ``block_fn(q, k, v, causal)`` (default: the exact kernels) does a block."""
    if block_fn is None:
        block_fn = partial(_block_forward, scale=scale, triton=triton)
    from adaattn_kernels import merge_attention_states_

    acc = _acc_dtype(q.dtype, ring.world)
    length = q.shape[2]
    out: torch.Tensor | None = None
    lse: torch.Tensor | None = None
    kv: tuple[torch.Tensor, ...] = (k, v)
    for step in range(ring.world):
        src = (ring.rank - step) % ring.world
        pending = None
        if step + 1 < ring.world:
            pending = ring.exchange(kv, _TAG_KV)  # overlaps the block below
        blk = _block(layout, causal, ring.rank, src, length)
        if blk is not None:
            o_b, l_b = block_fn(
                _seq(q, blk.rows), _seq(kv[0], blk.cols), _seq(kv[1], blk.cols), blk.causal
            )
            if out is None or lse is None:  # step 0, the own shard: every row
                out, lse = o_b.to(acc), l_b
            else:  # one fused pass, in place over the block's rows
                merge_attention_states_(_seq(out, blk.rows), _seq(lse, blk.rows), o_b, l_b)
        if pending is not None:
            pending.wait()
            kv = pending.received
    assert out is not None
    assert lse is not None
    return out.to(q.dtype), lse


def _ring_backward(
    do: torch.Tensor,
    dlse: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    causal: bool,
    scale: float,
    layout: str,
    ring: _Ring,
    triton: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rotate K/V again; the other ranks' dK/dV contributions to each shard travel home with it.

    Rank ``r``'s own block (step 0) gives its shard's own dK/dV contribution, which stays home.
    The accumulator of the *other* ranks' contributions to shard ``j`` starts at its first
    visitor (rank ``j + 1``, step 1), moves one rank per step with the shard, and after step
    ``W − 1`` takes its last hop home, where the own contribution is added: ``W − 1`` transfers
    per rank. Each transfer is posted as soon as its block is done and waited for only before
    the next addition, so it overlaps the next block; only the last hop is exposed.
    """
    # The reference blocks return float32/float64 gradients: accumulate them as they come.
    acc = _acc_dtype(q.dtype, ring.world) if triton else lse.dtype
    length = q.shape[2]
    kv: tuple[torch.Tensor, ...] = (k, v)
    dq: torch.Tensor | None = None
    own: tuple[torch.Tensor, ...] | None = None  # this shard's dK/dV from the own block
    travelling: _Pending | None = None  # the accumulator of the shard the next step holds
    for step in range(ring.world):
        src = (ring.rank - step) % ring.world
        kv_pending = ring.exchange(kv, _TAG_KV) if step + 1 < ring.world else None
        blk = _block(layout, causal, ring.rank, src, length)
        grads = None
        if blk is not None:
            rows = blk.rows
            grads = _block_backward(
                _seq(do, rows),
                _seq(q, rows),
                _seq(kv[0], blk.cols),
                _seq(kv[1], blk.cols),
                _seq(out, rows),
                _seq(lse, rows),
                None if dlse is None else _seq(dlse, rows),
                blk.causal,
                scale,
                triton,
            )
        if step == 0:
            # The own shard covers every row and column: its gradients start dQ and the own
            # dK/dV contribution (no zero fill, no extra pass).
            assert grads is not None
            dq, dk0, dv0 = (g.to(acc) for g in grads)
            own = (dk0, dv0)
        else:
            assert dq is not None
            if blk is not None and grads is not None:
                _seq(dq, blk.rows).add_(grads[0])
            dkv: tuple[torch.Tensor, ...]
            if travelling is None:  # step 1: this rank is the shard's first visitor
                if blk is not None and grads is not None and blk.cols == _ALL:
                    dkv = (grads[1].to(acc), grads[2].to(acc))
                    grads = None  # taken whole
                else:
                    dkv = (torch.zeros_like(kv[0], dtype=acc), torch.zeros_like(kv[1], dtype=acc))
            else:
                travelling.wait()
                dkv = travelling.received
            if blk is not None and grads is not None:
                _seq(dkv[0], blk.cols).add_(grads[1])
                _seq(dkv[1], blk.cols).add_(grads[2])
            travelling = ring.exchange(dkv, _TAG_DKV)
        if kv_pending is not None:
            kv_pending.wait()
            kv = kv_pending.received
    assert dq is not None
    assert own is not None
    dk, dv = own
    if travelling is not None:
        travelling.wait()  # every other rank's contribution to this rank's shard, home
        dk = dk.add_(travelling.received[0])
        dv = dv.add_(travelling.received[1])
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _local_chunks(layout: str, rank: int, world: int, length: int) -> list[tuple[slice, int]]:
    """``(local rows, global start)`` of each contiguous chunk of this rank's shard."""
    if layout == "contiguous":
        return [(slice(0, length), rank * length)]
    half = length // 2
    return [(slice(0, half), rank * half), (slice(half, length), (2 * world - 1 - rank) * half)]


def _hybrid_ring_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: HybridPlan,
    *,
    scale: float,
    layout: str,
    ring: _Ring,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal hybrid attention of the local queries: gather K/V, one call per local chunk.

    The keys and values of the whole sequence are all-gathered once (the context-parallel
    scheme of Llama 3, arXiv 2407.21783, §3.3.2); each contiguous chunk of local queries, at
    global positions ``[p, p + n)``, then runs :func:`adaattn_kernels.hybrid_attention` against
    the key prefix ``[0, p + n)`` with the bottom-right causal mask, which places its query ``i``
    at global position ``p + i``: its sinks, window and far-field segments are exactly those of
    the full-sequence call.
    """
    from adaattn_kernels.hybrid import hybrid_attention

    k_full = unshard_sequence(k, layout=layout, group=ring.group)  # type: ignore[arg-type]
    v_full = unshard_sequence(v, layout=layout, group=ring.group)  # type: ignore[arg-type]
    out = torch.empty_like(q)
    lse: torch.Tensor | None = None
    for rows, start in _local_chunks(layout, ring.rank, ring.world, q.shape[2]):
        end = start + (rows.stop - rows.start)
        o, l_ = hybrid_attention(
            q[:, :, rows], k_full[:, :, :end], v_full[:, :, :end], plan,
            causal=True, scale=scale, return_lse=True,
        )  # fmt: skip
        if lse is None:
            lse = torch.empty(q.shape[:3], dtype=l_.dtype, device=q.device)
        out[:, :, rows] = o
        lse[:, :, rows] = l_
    assert lse is not None
    return out, lse


def _uniform_hybrid(plan: HybridPlan) -> tuple[int, int, int] | None:
    """``(w, s, g)`` when every (batch, head) of ``plan`` is hybrid with the same values."""
    values = []
    for t in (plan.window, plan.sinks, plan.segment):
        lo, hi = (int(x) for x in torch.stack([t.min(), t.max()]).tolist())
        if lo != hi:
            return None
        values.append(lo)
    w, s, g = values
    return (w, s, g) if g > 0 else None


def _gather_chunk_tails(
    x: torch.Tensor, tail: int, layout: str, ring: _Ring
) -> dict[int, torch.Tensor]:
    """The last ``tail`` positions of every chunk of the sequence, by global chunk index."""
    chunks = _local_chunks(layout, ring.rank, ring.world, x.shape[2])
    mine = torch.stack([x[:, :, rows][:, :, -tail:] for rows, _ in chunks]).contiguous()
    parts = [torch.empty_like(mine) for _ in range(ring.world)]
    dist.all_gather(parts, mine, group=ring.group)
    size = chunks[0][0].stop - chunks[0][0].start
    out = {}
    for r, part in enumerate(parts):
        for j, (_, start) in enumerate(_local_chunks(layout, r, ring.world, x.shape[2])):
            out[start // size] = part[j]
    return out


def _hybrid_ring_halo(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    wsg: tuple[int, int, int],
    *,
    scale: float,
    layout: str,
    ring: _Ring,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal hybrid(w, s, g) on every head without gathering the sequence.

    For a chunk of queries at global positions ``[p, p + n)`` every query's window starts at or
    after ``a = g·⌊(p + 1 − w)/g⌋``, so its keys split into the *near* range ``[a, p + n)`` — the
    chunk plus a halo of at most ``w + g`` keys from the chunks before it — and a *far* part that
    is the same for every query of the chunk: the sink keys ``[0, s')`` and the far-field
    segments wholly before ``a`` (``s'`` is ``s`` rounded up to a segment, as in the kernel).
    The near range runs :func:`adaattn_kernels.hybrid_attention` with no sinks (``a`` is a
    segment boundary, so its windows and segments are the global ones); the far part is dense
    attention over the broadcast sink keys and over the segment means (all-reduced partial
    sums, one per segment), the latter with the log-multiplicity ``log g``; the three merge
    through their log-sum-exps. Chunks whose window reaches the sinks (``a ≤ s'``) take the
    whole prefix as their near range, which then also holds the sinks.
    """
    from adaattn_kernels import attention, merge_attention_states_
    from adaattn_kernels.hybrid import HybridPlan, hybrid_attention

    w, s, g = wsg
    b, hq, length, _ = q.shape
    chunks = _local_chunks(layout, ring.rank, ring.world, length)
    size = chunks[0][0].stop - chunks[0][0].start
    total = size * (2 * ring.world if layout == "zigzag" else ring.world)
    sinks_end = min(g * -(-s // g), total)
    tail = min(size, sinks_end + w + 2 * g)
    k_tails, v_tails = (_gather_chunk_tails(t, tail, layout, ring) for t in (k, v))
    # The sink keys (the start of chunk 0, held by group rank 0) and the far-field segment means.
    sink_kv = torch.stack([k[:, :, :sinks_end], v[:, :, :sinks_end]]).contiguous()
    if sinks_end > 0:
        dist.broadcast(sink_kv, src=dist.get_global_rank(ring.pg, 0), group=ring.group)
    nseg = -(-total // g)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    sums = torch.zeros(2, b, k.shape[1], nseg, k.shape[3], dtype=acc, device=q.device)
    for rows, start in chunks:
        # Segment sums of the chunk by a reshape: pad it out to whole segments (a plain sum per
        # segment, where a scatter-add would make g keys contend for every segment's slot).
        first, lead = divmod(start, g)
        count = -(-(lead + size) // g)
        kv = torch.stack([k[:, :, rows], v[:, :, rows]]).to(acc)
        kv = torch.nn.functional.pad(kv, (0, 0, lead, count * g - lead - size))
        sums[:, :, :, first : first + count] += kv.unflatten(3, (count, g)).sum(4)
    dist.all_reduce(sums, group=ring.group)
    means = (sums / g).to(q.dtype)  # only segments wholly before a chunk's near range are read
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], dtype=acc, device=q.device)
    for rows, start in chunks:
        a = g * (max(start + 1 - w, 0) // g)
        if a <= sinks_end:
            a = 0
        keys, values = [k[:, :, rows]], [v[:, :, rows]]
        for j in range(start // size - 1, -1, -1):  # the halo [a, start), chunk by chunk
            lo = max(a, j * size)
            if lo >= (j + 1) * size:
                break
            keys.insert(0, k_tails[j][:, :, lo - (j + 1) * size + tail :])
            values.insert(0, v_tails[j][:, :, lo - (j + 1) * size + tail :])
        near_plan = HybridPlan(
            *(torch.full((b, hq), x, dtype=torch.int32, device=q.device)
              for x in (w, s if a == 0 else 0, g)),
        )  # fmt: skip
        o, l_ = hybrid_attention(
            q[:, :, rows], torch.cat(keys, 2), torch.cat(values, 2), near_plan,
            causal=True, scale=scale, return_lse=True,
        )  # fmt: skip
        if a > 0:
            far = [(sink_kv[0], sink_kv[1], 0.0)] if sinks_end > 0 else []
            if a // g > sinks_end // g:
                segs = slice(sinks_end // g, a // g)
                far.append((means[0][:, :, segs], means[1][:, :, segs], math.log(g)))
            for kf, vf, bias in far:
                o_f, l_f = attention(q[:, :, rows], kf, vf, scale=scale, return_lse=True)
                merge_attention_states_(o, l_, o_f, (l_f + bias).to(l_.dtype))
        out[:, :, rows] = o
        lse[:, :, rows] = l_
    return out, lse


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        causal: bool,
        scale: float,
        layout: str,
        ring: _Ring,
        triton: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out, lse = _ring_forward(
            q, k, v, causal=causal, scale=scale, layout=layout, ring=ring, triton=triton
        )
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.options = {
            "causal": causal,
            "scale": scale,
            "layout": layout,
            "ring": ring,
            "triton": triton,
        }
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(
        ctx: Any, dout: torch.Tensor | None, dlse: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        ring = ctx.options["ring"]
        _warm_pass(ring, ring.signature, "bwd")
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = _ring_backward(dout, dlse, q, k, v, out, lse, **ctx.options)
        return dq, dk, dv, None, None, None, None, None


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------

_FP8_OPTIONS = ("qk_dtype", "pv_dtype", "granularity", "block_size", "outlier_channels")
_SIGNATURE = ("batch", "heads of q", "heads of k/v", "local length", "head_dim")
#: What a call runs, in the signature: the exact ring, the FP8 ring, or a hybrid plan.
_PATHS = (
    "precision='exact'", "precision='fp8'", "a hybrid plan, hybrid_kv='gather'",
    "a hybrid plan, hybrid_kv='halo'",
)  # fmt: skip


class _RecentKeys:
    """The ``capacity`` most recently used keys, the least recently used forgotten first.

    Bounds the per-process memory of call signatures (a server sees ever new lengths and
    plans).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._keys: OrderedDict[tuple[Any, ...], None] = OrderedDict()

    def seen(self, key: tuple[Any, ...]) -> bool:
        """Whether ``key`` is held; a held key becomes the most recently used."""
        if key not in self._keys:
            return False
        self._keys.move_to_end(key)
        return True

    def add(self, key: tuple[Any, ...]) -> None:
        """Hold ``key`` as the most recently used, forgetting the oldest beyond capacity."""
        self._keys[key] = None
        self._keys.move_to_end(key)
        while len(self._keys) > self.capacity:
            self._keys.popitem(last=False)

    def __len__(self) -> int:
        return len(self._keys)


#: Most recent signatures whose agreement across ranks was checked
#: (:func:`_check_same_on_all_ranks`), one memory per process group. The members of a group make
#: the same calls on it in the same order, so they forget the same keys and check a forgotten
#: signature again together; a memory shared by all groups would forget at a rate set by each
#: rank's calls on *other* groups, and two members could then disagree on whether to check.
_CHECKED_CAPACITY = 256
_CHECKED: dict[str, _RecentKeys] = {}
#: ``(bucketed signature key, "fwd" | "bwd")`` of the passes that ran in this process. The first
#: pass of a signature runs with ``overlap=False``: there the Triton autotuner benchmarks each
#: block's kernel configurations, and a transfer running beside them on the same SMs would skew
#: its timings (a config chosen under contention stays chosen for the life of the process).
#: Later passes overlap every transfer with compute.
_WARM = _RecentKeys(256)


def _tuning_bucket(n: int) -> int:
    """The dense kernel's autotuning bucket of a length.

    The same as ``adaattn_kernels.flash._triton_kernels.seq_bucket``, which imports Triton; a
    test keeps the two equal.
    """
    return 1 << max(0, min(n, 16384) - 1).bit_length()


def _warm_pass(ring: _Ring, key: tuple[Any, ...], kind: str) -> None:
    """Set ``ring.overlap`` for a pass of ``key`` (False the first time) and mark it seen.

    The kernels autotune per power-of-two bucket of the sequence length, so lengths of one
    bucket share their warm state: a prefill of a new length in a tuned bucket overlaps at once.
    """
    group, signature = key
    tuned = (group, (*signature[:3], _tuning_bucket(signature[3]), *signature[4:]))
    ring.signature = key
    ring.overlap = _WARM.seen((tuned, kind))
    _WARM.add((tuned, kind))


def _digest(value: object) -> int:
    """A CRC-32 of ``repr(value)``: equal on every rank for equal options (unlike ``hash``)."""
    return zlib.crc32(repr(value).encode())


def _check_same_on_all_ranks(
    ring: _Ring,
    q: torch.Tensor,
    k: torch.Tensor,
    causal: bool,
    scale: float,
    layout: str,
    *,
    path: int,
    options: int,
) -> tuple[Any, ...]:
    """One small all-gather per distinct call signature: the ranks must agree, or nobody runs.

    The signature holds the shapes, dtype, ``causal``, ``layout``, ``scale``, the path (exact,
    FP8 or hybrid plan: they run different collectives), a digest of its options (FP8 options or
    the plan's contents) and ``comm_priority`` (the high-priority group is created
    collectively). Mismatches would otherwise hang the ring (NCCL) or fail on one rank only. The
    check raises on every rank at once; a signature that passed is not gathered again. Returns
    the signature's key.
    """
    values = (*q.shape[:2], k.shape[1], q.shape[2], q.shape[3])
    signature = (
        *values, _FLOAT_DTYPES.index(q.dtype), int(causal), LAYOUTS.index(layout), scale,
        path, options, int(ring.comm_priority == "high"),
    )  # fmt: skip
    key = (ring.pg.group_name, signature)
    checked = _CHECKED.setdefault(ring.pg.group_name, _RecentKeys(_CHECKED_CAPACITY))
    if checked.seen(key):
        return key
    device = torch.device("cpu") if dist.get_backend(ring.pg) == "gloo" else q.device
    mine = torch.tensor(signature, dtype=torch.float64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(ring.world)]
    dist.all_gather(gathered, mine, group=ring.group)
    rows = [tuple(t.tolist()) for t in gathered]
    names = (*_SIGNATURE, "dtype", "causal", "layout", "scale", "path", "options", "priority")
    for i, name in enumerate(names):
        seen = [row[i] for row in rows]
        if len(set(seen)) > 1:
            if name == "dtype":
                seen = [str(_FLOAT_DTYPES[int(x)]).replace("torch.", "") for x in seen]
            elif name == "layout":
                seen = [LAYOUTS[int(x)] for x in seen]
            elif name == "causal":
                seen = [bool(x) for x in seen]
            elif name == "path":
                seen = [_PATHS[int(x)] for x in seen]
            elif name == "priority":
                name, seen = "comm_priority", [("group", "high")[int(x)] for x in seen]
            elif name == "options":
                name = "fp8_options or plan (digests)"
                seen = [int(x) for x in seen]
            elif name != "scale":
                seen = [int(x) for x in seen]
            raise ValueError(
                f"ring_attention got different {name} on the ranks of the group (rank: value "
                f"{dict(enumerate(seen))}); every rank must pass its shard of one sequence — "
                "same batch, heads, head_dim and local length (shard with shard_sequence) — and "
                "the same dtype, causal, layout, scale, precision, fp8_options, plan and "
                "comm_priority"
            )
    checked.add(key)
    return key


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    group: dist.ProcessGroup | None = None,
    layout: Layout = "zigzag",
    return_lse: bool = False,
    plan: HybridPlan | None = None,
    precision: Literal["exact", "fp8"] = "exact",
    fp8_options: Mapping[str, Any] | None = None,
    comm_priority: Literal["high", "group"] = "high",
    hybrid_kv: Literal["gather", "halo"] = "gather",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact attention over a sequence sharded across the ranks of ``group`` (ring attention).

    Every rank calls it with its own shards (cut by :func:`shard_sequence` with the same
    ``layout``) and gets the attention output of its own queries over the whole sequence:
    ``softmax(scale · Q Kᵀ) V`` restricted to its rows, equal to the corresponding shard of
    single-device attention up to floating-point rounding. Key/value shards rotate around the
    ring with point-to-point transfers overlapped with compute (see the module docs); the
    memory per rank is that of the local shards plus one visiting key/value shard.
    Differentiable in ``q``, ``k``, ``v`` (and ``lse`` when returned): the backward pass runs a
    second ring that carries the ``dK``/``dV`` accumulators home.

    Args:
        q: Local queries ``(B, Hq, S_local, D)``; float16/bfloat16 run the Triton kernels on
            CUDA, any float runs the reference elsewhere.
        k: Local keys ``(B, Hkv, S_local, D)``; ``Hq % Hkv == 0`` (grouped-query attention).
        v: Local values ``(B, Hkv, S_local, D)``.
        causal: Causal attention over the *global* positions (query ``i`` sees keys ``j ≤ i``);
            blocks above the diagonal are skipped.
        scale: Multiplier of ``Q Kᵀ``; default ``1/sqrt(D)``.
        group: The process group the sequence is split over; default the world group. Every
            rank of the group must call with the same shapes, dtype and options.
        layout: How the sequence was sharded: ``"zigzag"`` (default; balances causal work) or
            ``"contiguous"``. Only the positions matter, so without ``causal`` both give the
            same result.
        return_lse: Also return the local log-sum-exp ``(B, Hq, S_local)`` of each query's
            scaled scores over the whole sequence (float32; float64 for float64 inputs).
        plan: A :class:`~adaattn_kernels.HybridPlan` of shape ``(B, Hq)`` (the same on every
            rank) for hybrid attention: each head exact, or exact sinks + local window + pooled
            far field, exactly as :func:`adaattn_kernels.hybrid_attention` on the whole
            sequence. Causal and forward-only (inference prefill). Instead of the ring, the
            keys and values of the whole sequence are all-gathered once (Llama 3's
            context-parallel scheme: ``O(S)`` key/value memory per rank, about twice that
            while gathering; ``O(S_local)`` for everything else) and each contiguous chunk of
            local queries runs the hybrid kernel on its key prefix; a hybrid head's compute
            stays ``O(S_local · (w + s + S/g))``.
        precision: ``"exact"`` (default) or ``"fp8"``: every block runs
            :func:`adaattn_kernels.fp8.fp8_attention` (8-bit ``Q·Kᵀ`` and ``P·V``, quantised
            per block inside the op; the float8 simulation on CPU) and the blocks merge through
            its log-sum-exp. Inference only: inputs that require grad are rejected. The error
            is the FP8 op's own (each visiting shard is smoothed and scaled separately, which
            changes it little: the scales are per block of keys anyway).
        fp8_options: Keyword arguments for ``fp8_attention`` with ``precision="fp8"``
            (``qk_dtype``, ``pv_dtype``, ``granularity``, ``block_size``,
            ``outlier_channels``).
        hybrid_kv: How a ``plan`` reaches the keys it needs. ``"gather"`` (default): all-gather
            the keys and values of the whole sequence, any plan. ``"halo"``: for a uniform plan
            (:meth:`~adaattn_kernels.HybridPlan.uniform`) whose rounded-up sinks fit in the
            first chunk, all-gather only the last ``s' + w + 2g`` keys of every chunk (the
            halos), broadcast the sinks and all-reduce the far field's segment sums:
            ``O(S_local + S/g)`` memory per rank instead of ``O(S)``. Same result; on two
            H100s slower than ``"gather"`` at 32k–64k tokens and on par at 128k (see the
            distributed guide).
        comm_priority: Where an NCCL group's key/value transfers run. ``"high"`` (default):
            on a high-priority twin of ``group`` over the same ranks, created on the first call
            and kept (one extra NCCL communicator), so that each transfer overlaps its step's
            attention kernel instead of waiting behind it (measured on two H100s at 32k tokens,
            causal: forward 0.77× → 0.95× single-GPU throughput). Not needed, and not created,
            when ``TORCH_NCCL_HIGH_PRIORITY=1`` is set. ``"group"``: on ``group``'s own
            streams. Other backends (gloo) ignore it.

    Returns:
        The local output ``(B, Hq, S_local, D)`` in ``q.dtype``, or ``(output, lse)``.

    Raises:
        RuntimeError: ``torch.distributed`` is not initialised.
        NotImplementedError: ``plan`` with ``causal=False``.
        ValueError: ``precision="fp8"`` or ``plan`` with inputs that require grad, both at
            once, or unknown ``precision`` / ``fp8_options``.
        ValueError: bad shapes (the kernels' checks), ``q`` and ``k`` of different local
            lengths, an odd local length with ``"zigzag"``, an unknown ``layout``, a ``scale``
            that is not finite and positive, a process that is not in ``group``, or shapes and
            options that differ across the ranks (checked on the first call of each signature).
        TypeError: non-tensor inputs, unsupported dtypes, a non-bool ``causal``, or a
            ``plan`` that is not a ``HybridPlan``.
    """
    if not isinstance(causal, bool):
        raise TypeError(f"`causal` must be a bool, got {type(causal).__name__}")
    if precision not in ("exact", "fp8"):
        raise ValueError(f"`precision` must be 'exact' or 'fp8', got {precision!r}")
    if plan is not None:
        if not causal:
            raise NotImplementedError(
                "hybrid ring attention is causal only (prefill): a non-causal hybrid window is "
                "centred on each query, which a prefix of the gathered keys cannot express; "
                "run adaattn_kernels.hybrid_attention on the full sequence, or pass plan=None"
            )
        if precision != "exact":
            raise ValueError("`plan` (hybrid heads) and precision='fp8' cannot be combined")
        if torch.is_grad_enabled() and any(
            t.requires_grad for t in (q, k, v) if isinstance(t, torch.Tensor)
        ):
            raise ValueError(
                "hybrid ring attention (plan=...) is forward-only (inference prefill); call it "
                "under torch.no_grad() / torch.inference_mode(), or pass plan=None to train"
            )
    if hybrid_kv not in ("gather", "halo"):
        raise ValueError(f"`hybrid_kv` must be 'gather' or 'halo', got {hybrid_kv!r}")
    if hybrid_kv == "halo" and plan is None:
        raise ValueError("`hybrid_kv` only applies with a hybrid `plan`")
    if comm_priority not in ("high", "group"):
        raise ValueError(f"`comm_priority` must be 'high' or 'group', got {comm_priority!r}")
    if fp8_options is not None and precision != "fp8":
        raise ValueError("`fp8_options` is only used with precision='fp8'")
    options = dict(fp8_options or {})
    unknown = set(options) - set(_FP8_OPTIONS)
    if unknown:
        raise ValueError(
            f"`fp8_options` has unknown keys {sorted(unknown)}; allowed: {list(_FP8_OPTIONS)}"
        )
    if (
        precision == "fp8"
        and torch.is_grad_enabled()
        and any(t.requires_grad for t in (q, k, v) if isinstance(t, torch.Tensor))
    ):
        raise ValueError(
            "precision='fp8' ring attention is forward-only (inference); call it under "
            "torch.no_grad() / torch.inference_mode(), or use precision='exact' to train"
        )
    _check_layout(layout)
    _check_initialized("ring_attention")
    from adaattn_kernels._validation import check_attention_inputs, resolve_scale

    shape = check_attention_inputs(q, k, v)
    if shape.seq_q != shape.seq_k:
        raise ValueError(
            f"ring_attention shards one sequence: `q` has local length {shape.seq_q} but `k`/`v` "
            f"have {shape.seq_k}; shard q, k and v of the same sequence with shard_sequence"
        )
    if layout == "zigzag" and shape.seq_q % 2 != 0:
        raise ValueError(
            f"a zig-zag shard holds two equal chunks, but the local length is {shape.seq_q} "
            "(odd); shard with shard_sequence(..., layout='zigzag') (the global length must be a "
            "multiple of 2·world), or use layout='contiguous'"
        )
    s = resolve_scale(scale, shape.head_dim)
    ring = _Ring(group, comm_priority)
    if dist.get_backend(ring.pg) == "nccl" and not q.is_cuda:
        raise ValueError(
            f"the group's backend is NCCL but `q` is on {q.device}; move the shards to this "
            "rank's CUDA device, or use a gloo group for CPU tensors"
        )
    if plan is not None:
        from adaattn_kernels import HybridPlan

        if not isinstance(plan, HybridPlan):
            raise TypeError(f"`plan` must be a HybridPlan or None, got {type(plan).__name__}")
        if plan.shape != (shape.batch, shape.heads_q):
            raise ValueError(
                f"`plan` covers (batch, heads) = {plan.shape} but `q` has (B, Hq) = "
                f"{(shape.batch, shape.heads_q)}; build one plan entry per query head"
            )
        path = 2 if hybrid_kv == "gather" else 3
        digest = _digest([t.tolist() for t in (plan.window, plan.sinks, plan.segment)])
    else:
        path, digest = int(precision == "fp8"), _digest(sorted(options.items()))
    key = _check_same_on_all_ranks(ring, q, k, causal, s, layout, path=path, options=digest)
    if plan is not None:  # collectives only, no transfers to overlap
        if hybrid_kv == "halo":
            wsg = _uniform_hybrid(plan)
            size = shape.seq_q // 2 if layout == "zigzag" else shape.seq_q
            if wsg is None or wsg[2] * -(-wsg[1] // wsg[2]) > size:
                raise ValueError(
                    "hybrid_kv='halo' needs a uniform plan (every head hybrid with the same "
                    "window, sinks and segment; see HybridPlan.uniform) whose sinks, rounded up "
                    f"to a segment, fit in the first chunk ({size} tokens); use "
                    "hybrid_kv='gather' for this plan"
                )
            out, lse = _hybrid_ring_halo(q, k, v, wsg, scale=s, layout=layout, ring=ring)
        else:
            out, lse = _hybrid_ring_forward(q, k, v, plan, scale=s, layout=layout, ring=ring)
        return (out, lse) if return_lse else out
    _warm_pass(ring, key, "fwd")
    if precision == "fp8":
        from adaattn_kernels.fp8.naive import check_fp8_options

        check_fp8_options(
            options.get("pv_dtype", "fp8"),
            options.get("granularity", "block"),
            options.get("block_size", 128),
            options.get("qk_dtype", "int8"),
            options.get("outlier_channels", 0),
            shape.head_dim,
        )
        block = partial(_fp8_block_forward, scale=s, options=options)
        out, lse = _ring_forward(
            q, k, v, causal=causal, scale=s, layout=layout, ring=ring, triton=False,
            block_fn=block,
        )  # fmt: skip
    else:
        out, lse = _RingAttention.apply(q, k, v, causal, s, layout, ring, _runs_triton(q, k, v))
    return (out, lse) if return_lse else out
