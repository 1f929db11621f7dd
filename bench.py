"""Timing of the delta path at real LLM layer shapes, against the memory-bandwidth limit.

For each layer shape of MODELS and each batch size, a delta is compressed at the default
1/16 budget (deltacome's greedy allocation on a synthetic long-tailed delta, so the bands
look like real ones), checked against the PyTorch reference, then timed three ways:

    dense      x @ Wᵀ with the fp16 weight: what the base layer costs
    reference  delta_matmul_reference: dequantize Û, V̂, two matmuls
    triton     delta_matmul on the packed codes (two launches)

and reported as time, effective GB/s on the packed bytes (every stored byte: codes, scales,
zeros, σ), % of the device copy bandwidth measured in the same run, speed-up over the
reference, and delta/dense time. A whole-layer row per model runs all 7 projections of one
transformer block in sequence in one CUDA graph, base only vs base + delta.

Timing: every measured call is captured in a CUDA graph (launch gaps as in a served forward
pass) and replayed with triton.testing.do_bench, median. Each measurement cycles through
enough distinct copies of the operands to exceed the L2 cache twice, so small deltas are
read from HBM, not from L2. do_bench also clears L2 between replays.

Usage:
    python bench.py                      # full table (CUDA), or a small CPU table
    python bench.py --check              # the GPU equivalence matrix of issue 4
    python bench.py --models llama-2-7b --batches 1,16 --json runs/bench.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time

import torch

from deltacome import Config, compress_matrix, synthetic_delta
from kernel import choose_config, delta_matmul, delta_matmul_reference, prepare_delta

# (out, in) of the projections, PyTorch Linear layout.
MODELS = {
    "llama-2-7b": {"hidden": 4096, "kv": 4096, "inter": 11008},
    "llama-3-8b": {"hidden": 4096, "kv": 1024, "inter": 14336},
    "llama-2/3-70b": {"hidden": 8192, "kv": 1024, "inter": 28672},
}
CPU_MODELS = {"tiny (CPU)": {"hidden": 512, "kv": 128, "inter": 1376}}
BATCHES = (1, 2, 4, 8, 16, 32, 64)
CHECK_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (8192, 28672), (28672, 8192),
                (4095, 11007)]


def projections(m: dict) -> dict[str, tuple[int, int]]:
    h, kv, inter = m["hidden"], m["kv"], m["inter"]
    return {"q": (h, h), "k": (kv, h), "v": (kv, h), "o": (h, h),
            "gate": (inter, h), "up": (inter, h), "down": (h, inter)}


def unique_shapes(m: dict) -> list[tuple[int, int]]:
    return list(dict.fromkeys(projections(m).values()))


def make_delta(shape, device, seed=0, method="greedy"):
    """A compressed synthetic long-tailed delta; SVD on `device` (randomized: only the kept
    vectors are needed, and the full SVD of 28672×8192 would dominate the run)."""
    gen = torch.Generator().manual_seed(seed)
    delta = synthetic_delta(*shape, gen).to(device)
    return compress_matrix(delta, Config(method=method, device=str(device), svd="lowrank"))


def copies_of(cm, n: int):
    """n compressed matrices with cm's band layout and fresh random codes/scales: for L2
    rotation only (timing does not depend on the values)."""
    from deltacome import Band, CompressedMatrix, QuantizedVectors

    def qv(q):
        codes = torch.randint_like(q.codes, -2**31, 2**31 - 1)
        return QuantizedVectors(codes, q.scale.clone(), q.zero.clone(), q.bits, q.n,
                                q.group_size)
    return [cm] + [CompressedMatrix(cm.shape, cm.dtype, [Band(b.bits, b.S.clone(), qv(b.U),
                                                              qv(b.V)) for b in cm.bands])
                   for _ in range(n - 1)]


# ----------------------------------------------------------------------------------------------
# Timing.


def time_us(calls, graph: bool) -> float:
    """Median µs per call of `calls` (a list of closures run in turn, one per operand copy)."""
    import triton.testing

    if not graph:
        ms = triton.testing.do_bench(lambda: [f() for f in calls], warmup=10, rep=100,
                                     return_mode="median")
        return 1e3 * ms / len(calls)
    for f in calls:                                  # compile, build tables, warm allocator
        f()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for f in calls:
            f()
    torch.cuda.current_stream().wait_stream(stream)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in calls:
            f()
    ms = triton.testing.do_bench(g.replay, warmup=10, rep=100, return_mode="median")
    return 1e3 * ms / len(calls)


def copy_bandwidth() -> float:
    """Device-to-device copy of 1 GiB, bytes read + written per second (GB/s)."""
    import triton.testing
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200,
                                 return_mode="median")
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


# ----------------------------------------------------------------------------------------------
# The GPU equivalence matrix (issue 4) and the benchmark table (issue 5).


def check(shapes, batches, dtypes, device) -> list[dict]:
    """Triton vs the reference in the same dtype and vs the fp32 reference (≈ exact)."""
    rows = []
    print(f"{'shape':>12} {'bands':<22}{'dtype':>9}{'batch':>6}{'max|Δ| vs ref':>15}"
          f"{'rel vs ref':>12}{'rel vs fp32':>13}{'ref rel fp32':>14}")
    for shape in shapes:
        cm = make_delta(shape, device)
        kd = prepare_delta(cm, device)
        bands = ",".join(f"{b.bits}:{b.rank}" for b in cm.bands)
        for dtype in dtypes:
            for B in batches:
                x = torch.randn(B, shape[1], device=device).to(dtype)
                y = delta_matmul(x, kd, backend="triton")
                ref = delta_matmul_reference(x, cm)
                exact = delta_matmul_reference(x.float(), cm)
                row = dict(shape=list(shape), bands=bands, dtype=str(dtype)[6:], batch=B,
                           max_abs=float((y.float() - ref.float()).abs().max()),
                           max_ref=float(ref.float().abs().max()),
                           rel_vs_ref=rel_err(y, ref), rel_vs_fp32=rel_err(y, exact),
                           ref_rel_vs_fp32=rel_err(ref, exact))
                rows.append(row)
                print(f"{'x'.join(map(str, shape)):>12} {bands:<22}{row['dtype']:>9}{B:>6}"
                      f"{row['max_abs']:>15.3e}{row['rel_vs_ref']:>12.2e}"
                      f"{row['rel_vs_fp32']:>13.2e}{row['ref_rel_vs_fp32']:>14.2e}", flush=True)
    return rows


def bench(models, batches, dtype, device, l2_bytes: int, copy_gbs: float | None,
          config_fn=None) -> list[dict]:
    cuda = device.type == "cuda"
    rows = []
    header = (f"{'model':<15}{'shape':>12} {'bands':<20}{'B':>3}{'MB':>7}{'dense µs':>10}"
              f"{'ref µs':>10}" + (f"{'triton µs':>10}{'GB/s':>8}{'%copy':>7}{'×ref':>7}"
                                   f"{'Δ/dense':>8}" if cuda else ""))
    print(header)
    cache = {}
    for model, m in models.items():
        for shape in unique_shapes(m):
            if shape not in cache:
                cache[shape] = make_delta(shape, device)
            cm = cache[shape]
            nbytes = cm.nbytes()
            bands = ",".join(f"{b.bits}:{b.rank}" for b in cm.bands)
            n = max(1, math.ceil(2 * l2_bytes / nbytes)) if cuda else 1
            cms = copies_of(cm, n)
            kds = [prepare_delta(c, device) for c in cms] if cuda else []
            n_dense = max(1, math.ceil(2 * l2_bytes / (2 * shape[0] * shape[1]))) if cuda else 1
            Ws = [torch.randn(shape, device=device).to(dtype) * 0.02 for _ in range(n_dense)]
            for B in batches:
                x = torch.randn(B, shape[1], device=device).to(dtype)
                row = dict(model=model, shape=list(shape), bands=bands, batch=B,
                           packed_bytes=nbytes, dtype=str(dtype)[6:])
                ref = delta_matmul_reference(x, cm)
                if cuda:                                           # correctness before timing
                    config = config_fn(kds[0], B) if config_fn else None
                    y = delta_matmul(x, kds[0], backend="triton", config=config)
                    row["rel_err_vs_ref"] = rel_err(y, ref)
                    if not row["rel_err_vs_ref"] < (2e-2 if dtype == torch.bfloat16 else 4e-3):
                        print(f"FAIL {model} {shape} B={B}: rel. error {row['rel_err_vs_ref']:.2e}")
                        row["fail"] = True
                row["dense_us"] = time_us([lambda W=W: x @ W.mT for W in Ws], graph=cuda) \
                    if cuda else cpu_time_us(lambda: x @ Ws[0].mT)
                row["ref_us"] = time_us([lambda c=c: delta_matmul_reference(x, c)
                                         for c in cms[:4]], graph=False) \
                    if cuda else cpu_time_us(lambda: delta_matmul_reference(x, cm))
                line = (f"{model:<15}{'x'.join(map(str, shape)):>12} {bands:<20}{B:>3}"
                        f"{nbytes / 1e6:>7.2f}{row['dense_us']:>10.1f}{row['ref_us']:>10.1f}")
                if cuda:
                    row["triton_us"] = time_us(
                        [lambda k=k: delta_matmul(x, k, backend="triton", config=config)
                         for k in kds], graph=True)
                    row["gbs"] = nbytes / (row["triton_us"] * 1e-6) / 1e9
                    row["pct_copy"] = 100 * row["gbs"] / copy_gbs
                    row["speedup_vs_ref"] = row["ref_us"] / row["triton_us"]
                    row["delta_over_dense"] = row["triton_us"] / row["dense_us"]
                    line += (f"{row['triton_us']:>10.1f}{row['gbs']:>8.0f}{row['pct_copy']:>7.1f}"
                             f"{row['speedup_vs_ref']:>7.1f}{row['delta_over_dense']:>8.3f}")
                print(line, flush=True)
                rows.append(row)
    return rows, cache


def cpu_time_us(fn, reps: int = 5) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e6 * sorted(times)[len(times) // 2]


def layer_rows(models, batches, dtype, device, cache) -> list[dict]:
    """All 7 projections of one block in sequence, one CUDA graph: base only vs base + delta
    (Triton, base output fused). One block's fp16 weights exceed L2 many times over."""
    rows = []
    print(f"\n{'whole layer':<15}{'B':>3}{'delta MB':>10}{'base µs':>10}{'base+Δ µs':>11}"
          f"{'Δ µs':>8}{'Δ/base':>8}")
    for model, m in models.items():
        projs = projections(m)
        Ws = {p: torch.randn(s, device=device).to(dtype) * 0.02 for p, s in projs.items()}
        kds = {p: prepare_delta(cache[s] if s in cache else make_delta(s, device), device)
               for p, s in projs.items()}
        nbytes = sum(k.nbytes for k in kds.values())
        for B in batches:
            xs = {p: torch.randn(B, s[1], device=device).to(dtype) for p, s in projs.items()}

            def base_only():
                for p in projs:
                    xs[p] @ Ws[p].mT

            def with_delta():
                for p in projs:
                    delta_matmul(xs[p], kds[p], xs[p] @ Ws[p].mT, backend="triton")
            t_base = time_us([base_only], graph=True)
            t_delta = time_us([with_delta], graph=True)
            row = dict(model=model, batch=B, delta_bytes=nbytes, base_us=t_base,
                       base_plus_delta_us=t_delta, delta_us=t_delta - t_base,
                       delta_over_base=(t_delta - t_base) / t_base)
            rows.append(row)
            print(f"{model:<15}{B:>3}{nbytes / 1e6:>10.1f}{t_base:>10.1f}{t_delta:>11.1f}"
                  f"{t_delta - t_base:>8.1f}{row['delta_over_base']:>8.3f}", flush=True)
    return rows


def sweep(shapes, batches, dtype, device, l2_bytes) -> list[dict]:
    """Times a few launch configurations per shape/batch, for tuning choose_config."""
    rows = []
    sm = torch.cuda.get_device_properties(device).multi_processor_count
    for shape in shapes:
        cm = make_delta(shape, device)
        cms = copies_of(cm, max(1, math.ceil(2 * l2_bytes / cm.nbytes())))
        kds = [prepare_delta(c, device) for c in cms]
        for B in batches:
            x = torch.randn(B, shape[1], device=device).to(dtype)
            ref = delta_matmul_reference(x, cm)
            for waves in (1, 2, 4, 8, 16):
                for warps_v in ((1, 2, 4) if B == 1 else (1,)):
                    cfg = choose_config(kds[0], B, sm, waves=waves, warps_v=warps_v)
                    err = rel_err(delta_matmul(x, kds[0], backend="triton", config=cfg), ref)
                    us = time_us([lambda k=k: delta_matmul(x, k, backend="triton", config=cfg)
                                  for k in kds], graph=True)
                    gbs = cm.nbytes() / us / 1e3
                    rows.append(dict(shape=list(shape), batch=B, waves=waves, warps_v=warps_v,
                                     split_v=cfg.split_v, split_u=cfg.split_u, us=us, gbs=gbs,
                                     err=err))
                    print(f"sweep {shape} B={B} waves={waves} warps_v={warps_v} "
                          f"split=({cfg.split_v},{cfg.split_u}) {us:8.1f} µs {gbs:7.0f} GB/s "
                          f"err {err:.1e}", flush=True)
    return rows


def versions_line(device) -> str:
    import triton
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() \
        or platform.machine()
    return (f"device: {dev} | torch {torch.__version__} | triton {triton.__version__} | "
            f"python {platform.python_version()}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS),
                   help="comma-separated keys of MODELS (default: all)")
    p.add_argument("--batches", default=",".join(map(str, BATCHES)))
    p.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16")
    p.add_argument("--check", action="store_true",
                   help="run the equivalence matrix (issue 4 shapes, batch 1/7/16/64, fp16 "
                        "and bf16) instead of the timing table")
    p.add_argument("--sweep", action="store_true", help="time launch configurations")
    p.add_argument("--no-layer", action="store_true", help="skip the whole-layer rows")
    p.add_argument("--json", help="also write every number to this JSON file")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    batches = [int(b) for b in args.batches.split(",")]
    out = {"versions": versions_line(device), "argv": sys.argv[1:]}
    print(out["versions"])
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        l2 = getattr(props, "L2_cache_size", 50 * 2**20)
        out["copy_gbs"] = copy_bandwidth()
        print(f"copy bandwidth (read + write): {out['copy_gbs']:.0f} GB/s; "
              f"L2 {l2 / 2**20:.0f} MiB; {props.multi_processor_count} SMs")
    if args.check:
        if device.type != "cuda":
            print("--check needs CUDA")
            return 2
        out["check"] = check(CHECK_SHAPES, (1, 7, 16, 64), (torch.float16, torch.bfloat16),
                             device)
    elif args.sweep:
        out["sweep"] = sweep([(4096, 4096), (28672, 8192), (8192, 28672)], (1, 16), dtype,
                             device, l2)
    else:
        if device.type == "cuda":
            models = {k: MODELS[k] for k in args.models.split(",")}
            out["rows"], cache = bench(models, batches, dtype, device, l2, out["copy_gbs"])
            if not args.no_layer:
                out["layer"] = layer_rows(models, (1, 16), dtype, device, cache)
        else:
            print("CPU: no CUDA device, so reference and dense only, at a small shape")
            out["rows"], _ = bench(CPU_MODELS, [1, 16], torch.float32, device, 0, None)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {args.json}")
    return 1 if any(r.get("fail") for r in out.get("rows", [])) else 0


if __name__ == "__main__":
    sys.exit(main())
