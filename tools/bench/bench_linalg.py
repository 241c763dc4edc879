"""Benchmark adaattn-linalg: randomized SVD vs torch.svd_lowrank and scikit-learn, streaming-entropy
memory, and estimators on the implicit attention operator.

Run from the repo root: ``python -m tools.bench.bench_linalg`` (GPU: full sizes) or
``python -m tools.bench.bench_linalg --quick`` (CPU-sized). Writes ``results/linalg.json``
(``ADAATTN_RESULTS`` overrides the folder).

Fairness: every randomized SVD gets the same sketch size ``ℓ = k + p`` (ours: ``rank=k``,
``oversampling=p``; ``torch.svd_lowrank(q=k + p)``; scikit-learn ``n_oversamples=p``) and the same
number of power iterations; all are truncated to rank ``k`` before errors are measured. Errors are
``‖A - U S Vᵀ‖₂ / σ_{k+1}`` (1.0 is optimal), computed in float64.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import math
import time
from typing import Any

import torch
from adaattn_linalg import (
    AttentionOperator,
    randomized_svd,
    sampled_entropy,
    spectral_norm,
    streaming_entropy,
)

from tools.bench.common import median_ms, write_results


def _spectrum(kind: str, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    i = torch.arange(1, n + 1, dtype=dtype, device=device)
    if kind == "1/i":
        return 1.0 / i
    if kind == "exp(-i/10)":
        return torch.exp(-(i - 1) / 10)
    raise ValueError(kind)


def make_matrices(
    batch: int, n: int, kind: str, device: torch.device, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``A = U_i diag(σ) V_jᵀ`` with Haar-like random orthogonal factors, distinct ``(i, j)``.

    ``⌈√batch⌉`` factors of each side make ``batch`` distinct matrices: 2 × 16 QR factorisations
    instead of 2 × 256.
    """
    g = torch.Generator(device=device).manual_seed(seed)
    m = math.isqrt(batch - 1) + 1 if batch > 1 else 1
    u = torch.linalg.qr(torch.randn(m, n, n, generator=g, device=device)).Q
    v = torch.linalg.qr(torch.randn(m, n, n, generator=g, device=device)).Q
    s = _spectrum(kind, n, torch.float32, device)
    idx = torch.arange(batch, device=device)
    a = (u[idx // m] * s) @ v[idx % m].mT
    return a, s.double()


def spectral_error(
    a: torch.Tensor, u: torch.Tensor, s: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """Exact ``‖A - U diag(S) Vᵀ‖₂`` per batch entry, in float64."""
    r = a.double() - (u.double() * s.double().unsqueeze(-2)) @ v.double().mT
    return torch.linalg.matrix_norm(r.cpu(), ord=2)  # LAPACK: fast and exact enough


def bench_rsvd(quick: bool, device: torch.device) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    batch, n, k, p = (8, 256, 16, 10) if quick else (256, 1024, 32, 10)
    n_err = batch if quick else 32  # exact spectral errors on a subset (full SVD of residuals)
    for kind in ("1/i", "exp(-i/10)"):
        a, sig = make_matrices(batch, n, kind, device)
        tail = float(sig[k])
        for niter in (2, 7):
            cases = {
                "adaattn_linalg.randomized_svd": lambda a=a, niter=niter: randomized_svd(
                    a, k, oversampling=p, n_iter=niter, seed=0
                ),
                "adaattn_linalg.randomized_svd(normalizer=lu)": lambda a=a, niter=niter: (
                    randomized_svd(a, k, oversampling=p, n_iter=niter, normalizer="lu", seed=0)
                ),
                "torch.svd_lowrank": lambda a=a, niter=niter: torch.svd_lowrank(
                    a, q=k + p, niter=niter
                ),
            }
            for name, fn in cases.items():
                torch.manual_seed(0)
                u, s, v = fn()
                u, s, v = u[..., :k], s[..., :k], v[..., :k]
                err = spectral_error(a[:n_err], u[:n_err], s[:n_err], v[:n_err]) / tail
                # Frobenius error over the whole batch, relative to the optimum √(Σ_{i>k} σ_i²)
                fro = torch.linalg.matrix_norm(a - (u * s.unsqueeze(-2)) @ v.mT).double().cpu()
                fro_opt = float(sig[k:].pow(2).sum().sqrt())
                ms = median_ms(fn, warmup=3, rep=200)
                rows.append(
                    {
                        "bench": "rsvd",
                        "impl": name,
                        "device": str(device),
                        "spectrum": kind,
                        "batch": batch,
                        "m": n,
                        "n": n,
                        "rank": k,
                        "sketch": k + p,
                        "n_iter": niter,
                        "median_ms": ms,
                        "err_over_sigma_k1_mean": float(err.mean()),
                        "err_over_sigma_k1_max": float(err.max()),
                        "spectral_err_matrices": n_err,
                        "fro_err_over_optimal_mean": float((fro / fro_opt).mean()),
                        "fro_err_over_optimal_max": float((fro / fro_opt).max()),
                        "sv_rel_error_max": float(
                            ((s.double().cpu() - sig[:k].cpu()).abs() / sig[:k].cpu()).max()
                        ),
                    }
                )
                print(rows[-1], flush=True)
        del a
    return rows


def bench_rsvd_seeds(quick: bool, device: torch.device, seeds: int = 4) -> list[dict[str, Any]]:
    """Accuracy over several sketches: mean Frobenius error / optimum over ``seeds`` × batch.

    One sketch per implementation leaves a random difference; averaging over seeds shows whether
    one is systematically more accurate at the same sketch size and iteration count.
    """
    rows: list[dict[str, Any]] = []
    batch, n, k, p = (8, 256, 16, 10) if quick else (256, 1024, 32, 10)
    for kind in ("1/i", "exp(-i/10)"):
        a, sig = make_matrices(batch, n, kind, device)
        fro_opt = float(sig[k:].pow(2).sum().sqrt())
        for niter in (2, 7):
            for name in ("adaattn_linalg.randomized_svd", "torch.svd_lowrank"):
                ratios = []
                for seed in range(seeds):
                    if name == "torch.svd_lowrank":
                        torch.manual_seed(seed)
                        u, s, v = torch.svd_lowrank(a, q=k + p, niter=niter)
                    else:
                        u, s, v = randomized_svd(a, k, oversampling=p, n_iter=niter, seed=seed)
                    u, s, v = u[..., :k], s[..., :k], v[..., :k]
                    fro = torch.linalg.matrix_norm(a - (u * s.unsqueeze(-2)) @ v.mT).double()
                    ratios.append((fro / fro_opt).cpu())
                r = torch.stack(ratios)
                rows.append(
                    {
                        "bench": "rsvd_accuracy_over_seeds",
                        "impl": name,
                        "device": str(device),
                        "spectrum": kind,
                        "batch": batch,
                        "m": n,
                        "n": n,
                        "rank": k,
                        "sketch": k + p,
                        "n_iter": niter,
                        "seeds": seeds,
                        "fro_err_over_optimal_mean": float(r.mean()),
                        "fro_err_over_optimal_std_of_mean": float(r.std() / r.numel() ** 0.5),
                    }
                )
                print(rows[-1], flush=True)
        del a
    return rows


def bench_sklearn(quick: bool) -> list[dict[str, Any]]:
    try:
        from sklearn.utils.extmath import randomized_svd as sk_rsvd
    except ImportError:
        print("scikit-learn not importable: skipping the sklearn comparison")
        return []
    rows: list[dict[str, Any]] = []
    count, n, k, p = (2, 200, 10, 10) if quick else (4, 1024, 32, 10)
    cpu = torch.device("cpu")
    for kind in ("1/i", "exp(-i/10)"):
        a, sig = make_matrices(count, n, kind, cpu, seed=1)
        a = a.double()
        tail = float(sig[k])
        for idx in range(count):
            ai = a[idx]
            an = ai.numpy()
            ours = functools.partial(randomized_svd, ai, k, oversampling=p, seed=idx)
            sk = functools.partial(sk_rsvd, an, k, n_oversamples=p, n_iter="auto", random_state=idx)
            u, s, v = ours()
            e_ours = float(spectral_error(ai, u, s, v)) / tail
            uu, ss, vt = sk()
            e_sk = (
                float(
                    spectral_error(
                        ai, torch.from_numpy(uu), torch.from_numpy(ss), torch.from_numpy(vt.T)
                    )
                )
                / tail
            )
            for name, fn, e in (
                ("adaattn_linalg.randomized_svd", ours, e_ours),
                ("sklearn.randomized_svd", sk, e_sk),
            ):
                rows.append(
                    {
                        "bench": "rsvd_vs_sklearn",
                        "impl": name,
                        "device": "cpu",
                        "dtype": "float64",
                        "spectrum": kind,
                        "matrix": idx,
                        "m": n,
                        "n": n,
                        "rank": k,
                        "sketch": k + p,
                        "n_iter": "auto",
                        "median_ms": median_ms(fn, rep=60),
                        "err_over_sigma_k1": e,
                    }
                )
                print(rows[-1], flush=True)
    return rows


def bench_entropy_memory(quick: bool, device: torch.device) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    heads, d = (2, 64) if quick else (8, 128)
    seqs = (1024, 2048, 4096) if quick else (16384, 32768, 65536)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    for seq in seqs:
        g = torch.Generator(device=device).manual_seed(seq)
        q = torch.randn(1, heads, seq, d, device=device, dtype=dtype, generator=g)
        k = torch.randn(1, heads, seq, d, device=device, dtype=dtype, generator=g)
        row: dict[str, Any] = {
            "bench": "streaming_entropy_memory",
            "device": str(device),
            "dtype": str(dtype).removeprefix("torch."),
            "batch": 1,
            "heads": heads,
            "seq": seq,
            "head_dim": d,
            "causal": True,
            "input_bytes": 2 * q.numel() * q.element_size(),
        }
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            h = streaming_entropy(q, k, causal=True)
            torch.cuda.synchronize()
            row["seconds"] = time.perf_counter() - t0
            row["peak_bytes_above_inputs"] = torch.cuda.max_memory_allocated() - base
            row["dense_scores_bytes_fp32"] = heads * seq * seq * 4
        else:
            t0 = time.perf_counter()
            h = streaming_entropy(q, k, causal=True)
            row["seconds"] = time.perf_counter() - t0
        row["mean_entropy"] = float(h.float().mean())
        rows.append(row)
        print(row, flush=True)
        del q, k, h
    if device.type == "cuda":
        # Linear growth: the extra peak per extra token is the same between consecutive sizes.
        for prev, cur in itertools.pairwise(rows):
            cur["peak_increase_per_added_token"] = (
                cur["peak_bytes_above_inputs"] - prev["peak_bytes_above_inputs"]
            ) / (cur["seq"] - prev["seq"])
    return rows


def bench_sampled_entropy(quick: bool, device: torch.device) -> list[dict[str, Any]]:
    """Time of the planner's measurement: entropy of 64 sampled rows per head vs all rows."""
    rows: list[dict[str, Any]] = []
    heads, d = (4, 64) if quick else (32, 128)
    seqs = (1024, 4096) if quick else (8192, 32768)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    for seq in seqs:
        g = torch.Generator(device=device).manual_seed(seq + 1)
        q = torch.randn(1, heads, seq, d, device=device, dtype=dtype, generator=g)
        k = torch.randn(1, heads // 4, seq, d, device=device, dtype=dtype, generator=g)  # GQA 4:1
        est = sampled_entropy(q, k, num_samples=64, causal=True, seed=0)
        full = streaming_entropy(q, k, causal=True)
        true_mean = full.mean(-1)
        covered = ((est.low <= true_mean) & (true_mean <= est.high)).float().mean()
        row = {
            "bench": "sampled_entropy",
            "device": str(device),
            "dtype": str(dtype).removeprefix("torch."),
            "heads_q": heads,
            "heads_kv": heads // 4,
            "seq": seq,
            "head_dim": d,
            "num_samples": 64,
            "median_ms_sampled": median_ms(
                lambda q=q, k=k: sampled_entropy(q, k, num_samples=64, causal=True, seed=0),
                warmup=3,
                rep=50,
            ),
            "median_ms_all_rows": median_ms(
                lambda q=q, k=k: streaming_entropy(q, k, causal=True), warmup=1, rep=20
            ),
            "mean_abs_error_of_head_mean": float((est.mean - true_mean).abs().mean()),
            "ci95_coverage_over_heads": float(covered),
        }
        rows.append(row)
        print(row, flush=True)
        del q, k
    return rows


def bench_attention_operator(quick: bool, device: torch.device) -> list[dict[str, Any]]:
    seq, d, k = (1024, 64, 8) if quick else (32768, 128, 16)
    g = torch.Generator(device=device).manual_seed(7)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    q = torch.randn(1, 1, seq, d, device=device, dtype=dtype, generator=g)
    kk = torch.randn(1, 1, seq, d, device=device, dtype=dtype, generator=g)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    op = AttentionOperator(q, kk, causal=True)
    svd = randomized_svd(op, k, n_iter=2, seed=0)
    sn = spectral_norm(op, seed=0, max_iter=100)
    if device.type == "cuda":
        torch.cuda.synchronize()
    row: dict[str, Any] = {
        "bench": "attention_operator",
        "device": str(device),
        "seq": seq,
        "head_dim": d,
        "causal": True,
        "rank": k,
        "n_iter": 2,
        "seconds_rsvd_plus_spectral_norm": time.perf_counter() - t0,
        "top_singular_values": [float(x) for x in svd.S.flatten()[:4]],
        "spectral_norm": float(sn.flatten()[0]),
    }
    if device.type == "cuda":
        row["peak_bytes_above_inputs"] = torch.cuda.max_memory_allocated() - base
        row["dense_matrix_bytes_fp32"] = seq * seq * 4
    print(row, flush=True)
    return [row]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small CPU-sized problems")
    parser.add_argument(
        "--only",
        choices=("rsvd", "seeds", "sklearn", "entropy", "sampled", "operator"),
        action="append",
    )
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    quick = args.quick or device.type == "cpu"
    only = set(args.only or ("rsvd", "seeds", "sklearn", "entropy", "sampled", "operator"))
    rows: list[dict[str, Any]] = []
    if "rsvd" in only:
        rows += bench_rsvd(quick, device)
    if "seeds" in only:
        rows += bench_rsvd_seeds(quick, device)
    if "sklearn" in only:
        rows += bench_sklearn(quick)
    if "entropy" in only:
        rows += bench_entropy_memory(quick, device)
    if "sampled" in only:
        rows += bench_sampled_entropy(quick, device)
    if "operator" in only:
        rows += bench_attention_operator(quick, device)
    write_results("linalg", rows, quick=quick, tf32=torch.backends.cuda.matmul.allow_tf32)


if __name__ == "__main__":
    main()
