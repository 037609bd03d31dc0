"""Compile gradbal's Triton kernels ahead of time for an H100 (sm_90), without a GPU.

Run as a script in a process where ``TRITON_INTERPRET`` is unset (the interpreter replaces
``@triton.jit`` functions with objects that cannot be compiled). Triton's own compiler and
its bundled ``ptxas`` lower each kernel to PTX and SASS, which catches what the interpreter
lets through (ops or dtypes the GPU back end rejects, type mismatches in ``tl.where``,
constexpr misuse). Prints one line per variant and exits non-zero if any failed.
"""

from __future__ import annotations

import importlib
import itertools
import multiprocessing
import os
import sys

if os.environ.get("TRITON_INTERPRET"):
    sys.exit("TRITON_INTERPRET is set: the kernels would be interpreted, not compiled")

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

HOPPER = GPUTarget("cuda", 90, 64)


def variants():
    """(name, kernel, signature, constexprs, options) for the launches the wrappers make."""
    gram = importlib.import_module("gradbal.kernels.gram")
    combine = importlib.import_module("gradbal.kernels.combine")
    graddrop = importlib.import_module("gradbal.kernels.graddrop")
    next_pow2 = importlib.import_module("gradbal.kernels._launch").next_pow2
    # The Gram pass: the plans gram.plan_gram makes (fma or tl.dot, tile sizes, warps) for
    # every padded K, as launched on an H100 (132 SMs), with the default (tuned) unroll and with
    # the other unrolls a tuning run may pick (1, 2, 4: a tuple of that many loaded tiles);
    # K = 8 and 16 also with the other block product forced (use_dot flipped), as the sweep
    # in benchmarks/tune_gram.py tries them.
    torch_dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    for dt, k in itertools.product(torch_dtypes, [2, 3, 5, 8, 16, 32, gram.MAX_K]):
        default = gram.plan_gram(k, 10**7, torch_dtypes[dt])
        plans = [default] + [
            gram.plan_gram(k, 10**7, torch_dtypes[dt], unroll=u) for u in (1, 2, 4)
            if u != default.unroll
        ]
        if k in (8, 16):
            plans.append(gram.plan_gram(k, 10**7, torch_dtypes[dt], use_dot=not default.use_dot))
        finished = set()  # the finish kernel depends on K, KP and P only
        for plan in plans:
            kp = plan.k_pad
            for count in [True, False]:
                sig = {
                    "rows_ptr": f"*{dt}", "stride_k": "i64", "part_ptr": "*fp64",
                    "cnt_ptr": "*i64", "N": "i64", "num_blocks": "i32", "K": "constexpr",
                    "KP": "constexpr", "BLOCK": "constexpr", "USE_DOT": "constexpr",
                    "DOT_NATIVE": "constexpr", "COUNT_NONFINITE": "constexpr",
                    "UNROLL": "constexpr",
                }
                consts = {
                    "K": k, "KP": kp, "BLOCK": plan.block, "USE_DOT": plan.use_dot,
                    "DOT_NATIVE": plan.use_dot and dt != "fp32", "COUNT_NONFINITE": count,
                    "UNROLL": plan.unroll,
                }
                yield (
                    f"gram partials {dt} K={k} dot={plan.use_dot} unroll={plan.unroll} "
                    f"count={count}"
                ), gram._gram_partials_kernel, sig, consts, {"num_warps": plan.num_warps}
                if (kp, count) in finished:
                    continue
                finished.add((kp, count))
                sig = {
                    "part_ptr": "*fp64", "cnt_ptr": "*i64", "g_ptr": "*fp64",
                    "cnt_out_ptr": "*i64", "P": "i32", "K": "constexpr", "KP": "constexpr",
                    "BLOCK_P": "constexpr", "COUNT_NONFINITE": "constexpr",
                }
                warps = 8 if kp * kp >= 4096 else 4
                # The tuned plans run 1, 2 or 4 programs per SM: P, hence BLOCK_P, varies.
                for block_p in sorted({max(1, min(next_pow2(132 * per_sm), 8192 // (kp * kp)))
                                       for per_sm in (1, 2, 4)}):
                    consts = {"K": k, "KP": kp, "BLOCK_P": block_p, "COUNT_NONFINITE": count}
                    yield (f"gram finish {dt} K={k} count={count} BLOCK_P={block_p}",
                           gram._gram_finish_kernel, sig, consts, {"num_warps": warps})
    for dt, odt, k, acc, mode in itertools.product(
        ["fp32", "bf16", "fp16"], ["fp32", "bf16"], [2, 16], [True, False], [0, 2]
    ):
        sig = {
            "rows_ptr": f"*{dt}", "stride_k": "i64", "w_ptr": "*fp64", "stride_w": "i64",
            "scale_ptr": "*fp64", "scale_val": "fp32", "out_ptr": f"*{odt}", "N": "i64",
            "num_blocks": "i32", "K": "constexpr", "BLOCK": "constexpr",
            "ACCUMULATE": "constexpr", "SCALE": "constexpr", "BF16_RNE": "constexpr",
        }
        consts = {
            "K": k, "BLOCK": 4096 // (4 if dt == "fp32" else 2), "ACCUMULATE": acc,
            "SCALE": mode, "BF16_RNE": False,
        }
        yield f"combine {dt}->{odt} K={k} acc={acc} scale={mode}", \
            combine._combine_kernel, sig, consts, {"num_warps": 4}
    cases = [(*c, False) for c in itertools.product(
        ["fp32", "bf16", "fp16"], ["fp32", "bf16", "fp64"], [2, 16], [True, False]
    )] + [(dt, dt, 2, leak, True) for dt in ["fp32", "bf16"] for leak in [True, False]]
    for dt, odt, k, leak, acc in cases:
        sig = {
            "rows_ptr": f"*{dt}", "stride_k": "i64", "noise_ptr": "*fp32", "keep_ptr": "*fp32",
            "drop_ptr": "*fp32", "out_ptr": f"*{odt}", "N": "i64", "num_blocks": "i32",
            "K": "constexpr", "BLOCK": "constexpr", "LEAK": "constexpr",
            "ACCUMULATE": "constexpr", "OUT_F64": "constexpr", "BF16_RNE": "constexpr",
        }
        consts = {
            "K": k, "BLOCK": 4096 // (4 if dt == "fp32" else 2), "LEAK": leak,
            "ACCUMULATE": acc, "OUT_F64": odt == "fp64", "BF16_RNE": False,
        }
        yield f"graddrop {dt}->{odt} K={k} leak={leak} acc={acc}", \
            graddrop._graddrop_kernel, sig, consts, {"num_warps": 4, "enable_fp_fusion": False}

    # The K x K eigendecomposition (Aligned-MTL, IMTL-G, ConFIG on CUDA): every K the tests
    # check, fp64 input, and fp32 input at two sizes.
    eigh = importlib.import_module("gradbal.kernels.eigh")
    for k, parallel in itertools.product([2, 3, 4, 8, 16, 32], [False, True]):
        kp = eigh._k_pad(k, parallel)
        for dt in (["fp64", "fp32"] if k in (4, 32) else ["fp64"]):
            sig = {
                "a_ptr": f"*{dt}", "stride_b": "i64", "stride_r": "i64", "stride_c": "i64",
                "w_ptr": "*fp64", "v_ptr": "*fp64", "sweeps": "i32",
                "K": "constexpr", "KP": "constexpr", "N": "constexpr", "PARALLEL": "constexpr",
            }
            consts = {"K": k, "KP": kp, "N": k + k % 2, "PARALLEL": parallel}
            yield f"eigh {dt} K={k} parallel={parallel}", eigh._eigh_kernel, sig, consts, \
                {"num_warps": eigh._num_warps(kp)}

    # The eigen methods' whole stage (Aligned-MTL for K >= 2, IMTL-G and ConFIG for K >= 3 on
    # CUDA): each mode (Aligned-MTL with each scale mode) at every padded K, cyclic (the
    # default) and, at K = 4 and 16, parallel; fp64 and fp32 input at K = 4.
    spectral = importlib.import_module("gradbal.kernels.spectral")
    for k, mode in itertools.product([2, 3, 4, 8, 16, 32], range(3)):
        for scale in (range(3) if mode == 0 else [0]):
            for parallel in ([False, True] if k in (4, 16) else [False]):
                kp = eigh._k_pad(k, parallel)
                for dt in (["fp64", "fp32"] if k == 4 else ["fp64"]):
                    sig = {
                        "g_ptr": f"*{dt}", "stride_r": "i64", "stride_c": "i64", "p_ptr": "*fp64",
                        "w_ptr": "*fp64", "sweeps": "i32", "K": "constexpr", "KP": "constexpr",
                        "N": "constexpr", "PARALLEL": "constexpr", "MODE": "constexpr",
                        "SCALE": "constexpr",
                    }
                    consts = {"K": k, "KP": kp, "N": k + k % 2, "PARALLEL": parallel, "MODE": mode,
                              "SCALE": scale}  # fmt: skip
                    yield (f"spectral {dt} K={k} mode={mode} scale={scale} parallel={parallel}",
                           spectral._spectral_kernel, sig, consts,
                           {"num_warps": eigh._num_warps(kp)})  # fmt: skip

    # The min-norm simplex solver (MGDA and MoKD for K >= 3 on CUDA): each padded K, fp64 and
    # fp32 input, with the launch's REFINE and warps.
    min_norm = importlib.import_module("gradbal.kernels.min_norm")
    for k in [3, 5, 8, 16, 32]:
        for dt in ["fp64", "fp32"]:
            sig = {
                "g_ptr": f"*{dt}", "stride_b": "i64", "stride_r": "i64", "stride_c": "i64",
                "w_ptr": "*fp64", "max_iter": "i32", "K": "constexpr", "KP": "constexpr",
                "REFINE": "constexpr",
            }
            consts = {"K": k, "KP": max(2, next_pow2(k)), "REFINE": min_norm.REFINE_STEPS}
            yield f"min_norm {dt} K={k}", min_norm._min_norm_kernel, sig, consts, \
                {"num_warps": 1 if k <= 16 else 4}

    # MoKD's fused stage: each padded K, each option combination the method can ask for.
    for k in [2, 3, 8, 16, 32]:
        for log_scale, mean_loss, clip in itertools.product([True, False], repeat=3):
            if mean_loss and not log_scale:
                continue  # MoKD passes mean_loss only with log scaling on
            sig = {
                "g_ptr": "*fp64", "stride_r": "i64", "stride_c": "i64", "l_ptr": "*fp64",
                "w_ptr": "*fp64", "floor_hi": "fp32", "floor_lo": "fp32", "max_norm_hi": "fp32",
                "max_norm_lo": "fp32", "max_iter": "i32", "K": "constexpr", "KP": "constexpr",
                "REFINE": "constexpr", "LOG_SCALE": "constexpr", "MEAN_LOSS": "constexpr",
                "CLIP": "constexpr",
            }
            consts = {"K": k, "KP": max(2, next_pow2(k)), "REFINE": min_norm.REFINE_STEPS,
                      "LOG_SCALE": log_scale, "MEAN_LOSS": mean_loss, "CLIP": clip}  # fmt: skip
            yield (f"mokd_weights K={k} log={log_scale} mean={mean_loss} clip={clip}",
                   min_norm._mokd_kernel, sig, consts, {"num_warps": 1 if k <= 16 else 4})

    # Normalised MGDA's fused stage: each padded K, each normaliser and apply_to; an fp32 Gram
    # matrix and fp32 losses once.
    for k in [2, 3, 8, 16, 32]:
        for norm, normalized in itertools.product([1, 2, 3], [True, False]):
            for dt in (["fp64", "fp32"] if (k, norm, normalized) == (8, 3, True) else ["fp64"]):
                sig = {
                    "g_ptr": f"*{dt}", "stride_r": "i64", "stride_c": "i64", "l_ptr": f"*{dt}",
                    "w_ptr": "*fp64", "floor_hi": "fp32", "floor_lo": "fp32", "max_iter": "i32",
                    "K": "constexpr", "KP": "constexpr", "REFINE": "constexpr", "NORM": "constexpr",
                    "APPLY_NORMALIZED": "constexpr",
                }
                consts = {"K": k, "KP": max(2, next_pow2(k)), "REFINE": min_norm.REFINE_STEPS,
                          "NORM": norm, "APPLY_NORMALIZED": normalized}  # fmt: skip
                yield (f"mgda_normalized {dt} K={k} norm={norm} normalized={normalized}",
                       min_norm._mgda_normalized_kernel, sig, consts,
                       {"num_warps": 1 if k <= 16 else 4})  # fmt: skip

    # The dual-cone projections (UPGrad, DualProj for K >= 3 on CUDA): the same sizes.
    dual_cone = importlib.import_module("gradbal.kernels.dual_cone")
    for k in [3, 5, 8, 16, 32]:
        for dt in ["fp64", "fp32"]:
            sig = {
                "g_ptr": f"*{dt}", "stride_r": "i64", "stride_c": "i64", "u_ptr": "*fp64",
                "v_ptr": "*fp64", "reg_hi": "fp32", "reg_lo": "fp32", "eps_hi": "fp32",
                "eps_lo": "fp32", "max_iter": "i32", "K": "constexpr", "KP": "constexpr",
                "REFINE": "constexpr",
            }
            consts = {"K": k, "KP": max(2, next_pow2(k)), "REFINE": dual_cone.REFINE_STEPS}
            yield f"dual_cone {dt} K={k}", dual_cone._dual_cone_kernel, sig, consts, \
                {"num_warps": 1 if k <= 16 else 4}

    # FairGrad's / Nash-MTL's weights (K >= 3 on CUDA): alpha = 1 (log) and the power form.
    fair = importlib.import_module("gradbal.kernels.fair")
    for k in [3, 5, 8, 16, 32]:
        for dt in ["fp64", "fp32"]:
            for alpha_one in [True, False]:
                sig = {
                    "g_ptr": f"*{dt}", "stride_r": "i64", "stride_c": "i64", "w_ptr": "*fp64",
                    "alpha_hi": "fp32", "alpha_lo": "fp32", "ridge_hi": "fp32", "ridge_lo": "fp32",
                    "iterations": "i32", "newton": "i32", "K": "constexpr", "KP": "constexpr",
                    "REFINE": "constexpr", "LINE_N": "constexpr", "ALPHA_ONE": "constexpr",
                }
                consts = {"K": k, "KP": max(2, next_pow2(k)), "REFINE": fair.REFINE_STEPS,
                          "LINE_N": fair.LINE, "ALPHA_ONE": alpha_one}  # fmt: skip
                yield f"fair_weights {dt} K={k} alpha_one={alpha_one}", fair._fair_kernel, sig, \
                    consts, {"num_warps": 1 if k <= 16 else 4}

    # PCGrad's and GradVac's rounds (float64 G; GradVac from K = 2, PCGrad from K = 3).
    surgery = importlib.import_module("gradbal.kernels.surgery")
    for k in [2, 3, 5, 8, 16, 32]:
        options = {"num_warps": 1 if k <= 16 else 4}
        consts = {"K": k, "KP": max(2, next_pow2(k))}
        if k >= 3:
            sig = {"g_ptr": "*fp64", "stride_r": "i64", "stride_c": "i64", "order_ptr": "*i64",
                   "w_ptr": "*fp64", "K": "constexpr", "KP": "constexpr"}  # fmt: skip
            yield f"pcgrad_weights K={k}", surgery._pcgrad_kernel, sig, consts, options
        for on_conflict in [False, True]:
            sig = {
                "g_ptr": "*fp64", "stride_r": "i64", "stride_c": "i64", "order_ptr": "*i64",
                "target_ptr": "*fp64", "w_ptr": "*fp64", "new_target_ptr": "*fp64",
                "beta_hi": "fp32", "beta_lo": "fp32", "eps_hi": "fp32", "eps_lo": "fp32",
                "K": "constexpr", "KP": "constexpr", "ON_CONFLICT": "constexpr",
            }
            yield (f"gradvac_weights K={k} on_conflict={on_conflict}", surgery._gradvac_kernel, sig,
                   {**consts, "ON_CONFLICT": on_conflict}, options)  # fmt: skip

    # CAGrad's inner problem and direction (K >= 2 on CUDA).
    cagrad = importlib.import_module("gradbal.kernels.cagrad")
    for k in [2, 3, 5, 8, 16, 32]:
        for dt in ["fp64", "fp32"]:
            sig = {
                "g_ptr": f"*{dt}", "stride_r": "i64", "stride_c": "i64", "w_ptr": "*fp64",
                "c_hi": "fp32", "c_lo": "fp32", "eps_hi": "fp32", "eps_lo": "fp32", "div_hi": "fp32",
                "div_lo": "fp32", "max_iter": "i32", "K": "constexpr", "KP": "constexpr",
                "REFINE": "constexpr",
            }
            consts = {"K": k, "KP": max(2, next_pow2(k)), "REFINE": cagrad.REFINE_STEPS}
            yield f"cagrad_direction {dt} K={k}", cagrad._cagrad_kernel, sig, consts, \
                {"num_warps": 1 if k <= 16 else 4}


def _compile_share(worker: int, workers: int) -> tuple[int, list[str]]:
    """Compile every ``workers``-th variant from number ``worker`` on: (count, failures)."""
    count, failures = 0, []
    for i, (name, fn, sig, consts, options) in enumerate(variants()):
        if i % workers != worker:
            continue
        count += 1
        try:
            triton.compile(
                ASTSource(fn=fn, signature=sig, constexprs=consts), target=HOPPER, options=options
            )
        except Exception as err:  # noqa: BLE001 - report every failing variant, then fail
            failures.append(f"FAILED {name}: {type(err).__name__}: {str(err)[:500]}")
    return count, failures


def main() -> int:
    # One process per core (at most 4): on a cold Triton cache the 500-odd variants take
    # ~5.5 min in one process on the 2-core CI machine, and the test suite waits on this
    # script with its other core idle.
    workers = max(1, min(os.cpu_count() or 1, 4))
    if workers == 1:
        results = [_compile_share(0, 1)]
    else:
        ctx = multiprocessing.get_context("spawn")  # no fork of a process that has run torch
        with ctx.Pool(workers) as pool:
            results = pool.starmap(_compile_share, [(w, workers) for w in range(workers)])
    count = sum(c for c, _ in results)
    failures = [line for _, lines in results for line in lines]
    for line in failures:
        print(line)
    print(f"compiled {count - len(failures)} of {count} kernel variants for sm_90 "
          f"(triton {triton.__version__}, {workers} processes)")  # fmt: skip
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
