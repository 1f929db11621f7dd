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

Multi-tenant (--tenants 1,4,16,64): one token for each of N tenants (fine-tunes of one base)
through the 7 projections of one block, three ways: (a) N separate fp16 models (N GEMVs on N
distinct weights per projection), (b) the base GEMM for the batch plus a loop of N
single-delta kernels, (c) the base GEMM plus one batched multi_delta_matmul; reported as
time, tokens/s, GB/s on the bytes each way must read, and the memory per tenant, from which
how many fine-tunes fit beside one base in 80 GB.

Timing: every measured call is captured in a CUDA graph (launch gaps as in a served forward
pass) and replayed with triton.testing.do_bench, median. Each measurement cycles through
enough distinct copies of the operands to exceed the L2 cache twice, so small deltas are
read from HBM, not from L2, and one graph holds at least 16 calls, so the replay's own fixed
cost is spread as over a model's forward pass (see time_us). do_bench also clears L2
between replays.

Usage:
    python bench.py                      # full table (CUDA), or a small CPU table
    python bench.py --check              # the GPU equivalence matrix of issue 4
    python bench.py --models llama-2-7b --batches 1,16 --json runs/bench.json
    python bench.py --tenants 1,4,16,64 --models llama-2-7b      # multi-tenant scenario
    python bench.py --ceiling            # what one bare read-only launch streams
    python bench.py --sweep 4096x4096 --batches 2   # launch configurations vs choose_config
    ncu --kernel-name regex:"_[uv]_kernel" --launch-skip 4 --launch-count 2 \
        python bench.py --profile 28672x8192 --batches 1       # profile the third call
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import sys
import time

import torch
import triton
import triton.language as tl

from deltacome import Config, block_shapes, compress_matrix, synthetic_delta
from kernel import (FMA_ROWS, block_rows, choose_config, delta_matmul, delta_matmul_reference,
                    multi_delta_matmul, multi_delta_matmul_reference, plan_tenants,
                    prepare_delta, prepare_multi_delta)

# (out, in) of the projections, PyTorch Linear layout.
MODELS = {
    "llama-2-7b": {"hidden": 4096, "kv": 4096, "inter": 11008, "layers": 32, "vocab": 32000},
    "llama-3-8b": {"hidden": 4096, "kv": 1024, "inter": 14336, "layers": 32, "vocab": 128256},
    "llama-2/3-70b": {"hidden": 8192, "kv": 1024, "inter": 28672, "layers": 80,
                      "vocab": 128256},
}
CPU_MODELS = {"tiny (CPU)": {"hidden": 512, "kv": 128, "inter": 1376, "layers": 2,
                             "vocab": 512}}
BATCHES = (1, 2, 4, 8, 16, 32, 64)
SWEEP_SHAPES = ("4096x4096", "28672x8192", "8192x28672")
SWEEP_BATCHES = (1, 2, 16)
TENANTS = (1, 4, 16, 64)
HBM_BYTES = 80e9       # one 80 GB H100; weights only (no KV cache, activations or workspace)
CHECK_SHAPES = [(4095, 11007), (4096, 4096), (11008, 4096), (4096, 11008), (8192, 28672),
                (28672, 8192)]


def projections(m: dict) -> dict[str, tuple[int, int]]:
    return block_shapes(m["hidden"], m["kv"], m["inter"])


def unique_shapes(m: dict) -> list[tuple[int, int]]:
    return list(dict.fromkeys(projections(m).values()))


def progress(message: str):
    """A line on stderr saying what runs now: the tables on stdout stay clean, and a long
    set-up (compression, operand copies, bandwidth) does not look like a hang."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def make_delta(shape, device, seed=0, method="greedy"):
    """A compressed synthetic long-tailed delta; SVD on `device` (randomized: only the kept
    vectors are needed, and the full SVD of 28672×8192 would dominate the run)."""
    progress(f"compressing a synthetic {shape[0]}x{shape[1]} delta ({method}, 1/16, {device})")
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


def time_us(calls, graph: bool, min_calls: int = 16) -> float:
    """Median µs per call of `calls` (a list of closures run in turn, one per operand copy).
    graph=True: one CUDA graph replays the list, cycled until it holds at least min_calls
    calls. A replay has a fixed cost of its own (H100: a 28672×8192 delta pair took 28.9 µs
    a call in a graph of 2 calls, 26.3 in 4, 24.7 in 16; the dense GEMV 176.9 µs in a graph
    of 1, 165.0 in 4), which a model's graphed forward pass pays once, not per matmul. The
    copies are cycled in order, so an operand is read again only after all the others
    (more than 2× the L2 together, see `bench`)."""
    import triton.testing

    if not graph:
        ms = triton.testing.do_bench(lambda: [f() for f in calls], warmup=10, rep=100,
                                     return_mode="median")
        return 1e3 * ms / len(calls)
    calls = calls * -(-min_calls // len(calls))
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
    progress("measuring the copy bandwidth")
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200,
                                 return_mode="median")
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@triton.jit
def _read_only(src_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """Reads BLOCK int32 and writes one: a launch that does nothing but stream."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + tl.program_id(0), tl.sum(tl.load(src_ptr + i, mask=i < n, other=0), 0))


def streaming_ceiling(sizes_mb, device, l2_bytes: int, copy_gbs: float) -> list[dict]:
    """What one launch can stream: a bare Triton kernel reading n bytes (4-warp programs of
    4096 int32, 16-byte loads), CUDA-graphed and rotated through buffers past the L2 like the
    table's rows. The delta path is two dependent launches over its packed bytes, so this
    bounds it from above."""
    rows = []
    print(f"\n{'one launch, read only':<24}{'MB':>8}{'µs':>9}{'GB/s':>8}{'%copy':>7}")
    for mb in sizes_mb:
        n = int(mb * 1e6) // 4
        bufs = [torch.randint(0, 99, (n,), dtype=torch.int32, device=device)
                for _ in range(max(1, math.ceil(2 * l2_bytes / (4 * n))))]
        out = torch.empty(triton.cdiv(n, 4096), dtype=torch.int32, device=device)
        us = time_us([lambda b=b: _read_only[(triton.cdiv(n, 4096),)](b, out, n, BLOCK=4096,
                                                                      num_warps=4)
                      for b in bufs], graph=True)
        gbs = 4 * n / us / 1e3
        rows.append(dict(mb=mb, us=us, gbs=gbs, pct_copy=100 * gbs / copy_gbs))
        print(f"{'':<24}{mb:>8.2f}{us:>9.1f}{gbs:>8.0f}{100 * gbs / copy_gbs:>7.1f}", flush=True)
    return rows


def profile_workload(shape, batch: int, dtype, device) -> None:
    """Runs delta_matmul at one shape and batch 4 times with the default launch settings,
    for an external profiler (ncu, nsys): the third call's two kernels are launches 5 and 6."""
    kd = prepare_delta(make_delta(shape, device), device)
    x = torch.randn(batch, shape[1], device=device).to(dtype)
    for _ in range(4):
        delta_matmul(x, kd, backend="triton")
    torch.cuda.synchronize()
    print(f"ran {shape} batch {batch} four times")


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
            if cuda:
                progress(f"preparing {n} copies of the {shape[0]}x{shape[1]} delta (twice the L2)")
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
        nbytes = sum(sum(k.nbytes) for k in kds.values())
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


# ----------------------------------------------------------------------------------------------
# Multi-tenant serving (issue 8): N fine-tunes of one base, one token each, one block.


def model_fp16_bytes(m: dict) -> int:
    """fp16 bytes of the whole model: every block's 7 projections, the embedding and the
    lm_head (norms: a few hidden-sized vectors, left out)."""
    block = sum(o * i for o, i in projections(m).values())
    return 2 * (m["layers"] * block + 2 * m["vocab"] * m["hidden"])


def tenant_rows(model: str, m: dict, tenant_counts, dtype, device, copy_gbs) -> dict:
    """One token for each of N tenants (row t = tenant t, rows sorted) through the 7
    projections of one block, in one CUDA graph per way:

        (a) separate  N fp16 models: N GEMVs on N distinct weights per projection
        (b) loop      base GEMM (batch N) + N single-delta kernels (delta_matmul, batch 1)
        (c) batched   base GEMM (batch N) + one multi_delta_matmul (one launch pair)

    Bytes that must be read: (a) N × the block's fp16 weights; (b), (c) the base once plus
    each tenant's packed delta once. Tenant deltas are copies_of one compressed delta per
    projection (same band layout, fresh random codes: timing does not depend on the values).
    On CPU: the reference (a loop over tenants) instead of the kernels, at a small shape."""
    cuda = device.type == "cuda"
    projs = projections(m)
    n_max = max(tenant_counts)
    protos = {s: make_delta(s, device) for s in unique_shapes(m)}
    cms = {p: copies_of(protos[s], n_max) for p, s in projs.items()}         # p -> N deltas
    Ws = {p: (torch.randn(s, device=device) * 0.02).to(dtype) for p, s in projs.items()}
    kds = {p: [prepare_delta(c, device) for c in cms[p]] for p in projs} if cuda else {}
    base_bytes = sum(2 * o * i for o, i in projs.values())
    tenant_bytes = sum(cms[p][0].nbytes() for p in projs)                   # stored, per tenant
    rows = []
    print(f"\n{'tenants':<15}{'N':>4} {'way':<13}{'MB read':>9}{'µs':>10}{'tokens/s':>11}"
          f"{'GB/s':>8}" + (f"{'%copy':>7}{'×(a)':>7}{'×(b)':>7}" if cuda else ""))
    for N in tenant_counts:
        xs = {p: torch.randn(N, s[1], device=device).to(dtype) for p, s in projs.items()}
        idx = torch.arange(N)
        must = {"separate": N * base_bytes, "loop": base_bytes + N * tenant_bytes,
                "batched": base_bytes + N * tenant_bytes}
        fail = False
        Wn = {p: [Ws[p]] + [torch.empty_like(Ws[p]).normal_(0, 0.02) for _ in range(N - 1)]
              for p in projs}                                       # N distinct weights
        if cuda:
            mds = {p: prepare_multi_delta(cms[p][:N], device) for p in projs}
            plan = plan_tenants(idx, N, device)
            for p in projs:                                         # correctness before timing
                y = multi_delta_matmul(xs[p], mds[p], plan=plan, backend="triton")
                err = rel_err(y, multi_delta_matmul_reference(xs[p], cms[p][:N], idx))
                if not err < (2e-2 if dtype == torch.bfloat16 else 4e-3):
                    print(f"FAIL tenants {model} {p} N={N}: rel. error {err:.2e}")
                    fail = True

            def separate():
                for p in projs:
                    for t in range(N):
                        xs[p][t:t + 1] @ Wn[p][t].mT

            def loop():
                for p in projs:
                    y = xs[p] @ Ws[p].mT
                    for t in range(N):
                        delta_matmul(xs[p][t:t + 1], kds[p][t], y[t:t + 1], backend="triton")

            def batched():
                for p in projs:
                    multi_delta_matmul(xs[p], mds[p], None, xs[p] @ Ws[p].mT,
                                       backend="triton", plan=plan)
            ways = {"separate": separate, "loop": loop, "batched": batched}
            times = {w: time_us([f], graph=True) for w, f in ways.items()}
            del mds
        else:
            times = {
                "separate": cpu_time_us(lambda: [xs[p][t:t + 1] @ Wn[p][t].mT
                                                 for p in projs for t in range(N)]),
                "loop": cpu_time_us(lambda: [xs[p] @ Ws[p].mT + multi_delta_matmul_reference(
                    xs[p], cms[p][:N], idx) for p in projs])}
        Wn = None                                   # N × the block's weights: free them now
        if cuda:
            torch.cuda.empty_cache()
        for way, us in times.items():
            row = dict(model=model, tenants=N, way=way, bytes_read=must[way], us=us,
                       tokens_per_s=N / (us * 1e-6), gbs=must[way] / (us * 1e-6) / 1e9,
                       backend="triton" if cuda else "reference (CPU)", fail=fail)
            line = (f"{model:<15}{N:>4} {way if cuda else way + ' ref':<13}"
                    f"{must[way] / 1e6:>9.1f}{us:>10.1f}{row['tokens_per_s']:>11.0f}"
                    f"{row['gbs']:>8.0f}")
            if cuda:
                row["pct_copy"] = 100 * row["gbs"] / copy_gbs
                row["x_separate"] = times["separate"] / us
                row["x_loop"] = times["loop"] / us
                line += f"{row['pct_copy']:>7.1f}{row['x_separate']:>7.2f}{row['x_loop']:>7.2f}"
            print(line, flush=True)
            rows.append(row)
    device_bytes = sum(prepare_multi_delta(cms[p][:1], device).device_bytes[0] for p in projs)
    memory = dict(model=model, block_fp16_bytes=base_bytes, tenant_block_bytes=tenant_bytes,
                  tenant_block_device_bytes=device_bytes, model_fp16_bytes=model_fp16_bytes(m),
                  tenant_model_bytes=m["layers"] * tenant_bytes,
                  tenant_model_device_bytes=m["layers"] * device_bytes)
    spare = HBM_BYTES - memory["model_fp16_bytes"]
    memory["fit_delta_tenants"] = max(0, int(spare // memory["tenant_model_device_bytes"]))
    memory["fit_fp16_finetunes"] = max(0, int(spare // memory["model_fp16_bytes"]))
    print(f"memory per tenant: {tenant_bytes / 1e6:.2f} MB per block stored "
          f"({device_bytes / 1e6:.2f} MB in the kernels' layout), "
          f"{memory['tenant_model_device_bytes'] / 1e6:.1f} MB per {m['layers']}-block "
          f"fine-tune (7 projections per block; its other tensors are the base's, see "
          f"patch_model_tenants), vs {memory['model_fp16_bytes'] / 1e6:.1f} MB per fp16 model")
    print(f"beside one fp16 base in {HBM_BYTES / 1e9:.0f} GB (weights only): "
          f"{memory['fit_delta_tenants']} compressed fine-tunes, or "
          f"{memory['fit_fp16_finetunes']} fp16 fine-tunes", flush=True)
    return dict(rows=rows, memory=memory)


def sweep(shapes, batches, dtype, device, l2_bytes) -> list[dict]:
    """Times launch configurations per shape/batch, for tuning choose_config: programs per
    SM (waves), pipeline stages, on the FMA path (batch 1-2) the tile widths and phase U's
    registers, on the tl.dot path phase U's fp16 or tf32 dot; then prints choose_config's
    pick beside the fastest."""
    rows = []
    sm = torch.cuda.get_device_properties(device).multi_processor_count
    for shape in shapes:
        cm = make_delta(shape, device)
        cms = copies_of(cm, max(1, math.ceil(2 * l2_bytes / cm.nbytes())))
        kds = [prepare_delta(c, device) for c in cms]
        for B in batches:
            x = torch.randn(B, shape[1], device=device).to(dtype)
            ref = delta_matmul_reference(x, cm)
            block_b = block_rows(B)
            pick = choose_config(kds[0], block_b, sm)
            fma = pick.rows(block_b) <= FMA_ROWS
            o = 512 // min(B, FMA_ROWS)
            tilings = [(32, o), (64, o), (64, 2 * o), (128, o)] if fma else [(None, None)]
            configs = [pick] + [
                choose_config(kds[0], block_b, sm, waves=waves, block_j=block_j,
                              block_o=block_o, v_stages=v_st, u_stages=u_st, u_regs=u_regs,
                              u_fp16=u_fp16)
                for waves, (v_st, u_st), (block_j, block_o), u_regs, u_fp16 in
                itertools.product((8, 16, 32), ((1, 2), (1, 3), (1, 4), (2, 2), (2, 3)),
                                  tilings, (0, 128) if fma else (128,),
                                  (True,) if fma else (True, False))]
            for cfg in configs:
                bj, bo, _, _ = cfg.tiles(cfg.rows(block_b), kds[0].group_size)
                err = rel_err(delta_matmul(x, kds[0], backend="triton", config=cfg), ref)
                us = time_us([lambda k=k: delta_matmul(x, k, backend="triton", config=cfg)
                              for k in kds], graph=True)
                gbs = cm.nbytes() / us / 1e3
                rows.append(dict(shape=list(shape), batch=B, default=cfg is pick,
                                 waves=cfg.waves, v_stages=cfg.v_stages,
                                 u_stages=cfg.u_stages, u_regs=cfg.u_regs, block_j=bj,
                                 block_o=bo, u_fp16=cfg.u_fp16, split_v=cfg.split_v,
                                 rows_u=cfg.rows_u, us=us, gbs=gbs, err=err))
                print(f"sweep {shape} B={B} {'default ' if cfg is pick else ''}"
                      f"waves={cfg.waves} stages={cfg.v_stages},{cfg.u_stages} block_j={bj} "
                      f"block_o={bo} u_regs={cfg.u_regs} u_fp16={cfg.u_fp16} "
                      f"split_v={cfg.split_v} rows_u={cfg.rows_u} {us:8.1f} µs {gbs:7.0f} "
                      f"GB/s err {err:.1e}", flush=True)
            mine = [r for r in rows if r["shape"] == list(shape) and r["batch"] == B]
            best = min(mine, key=lambda r: r["us"])
            default = next(r for r in mine if r["default"])
            print(f"sweep {shape} B={B}: choose_config {default['us']:.1f} µs, fastest "
                  f"{best['us']:.1f} µs (waves={best['waves']} stages={best['v_stages']},"
                  f"{best['u_stages']} block_j={best['block_j']} block_o={best['block_o']} "
                  f"u_regs={best['u_regs']} u_fp16={best['u_fp16']})", flush=True)
    return rows


def parse_shape(p, option: str, text: str) -> tuple[int, int]:
    """OUTxIN -> (out, in), or the parser's one-line error."""
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
        assert len(shape) == 2 and min(shape) > 0
    except (ValueError, AssertionError):
        p.error(f"{option} takes OUTxIN, e.g. 28672x8192, not {text!r}")
    return shape


def versions_line(device) -> str:
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() \
        or platform.machine()
    return (f"device: {dev} | torch {torch.__version__} | triton {triton.__version__} | "
            f"python {platform.python_version()}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS),
                   help="comma-separated keys of MODELS (default: all)")
    p.add_argument("--batches", help="comma-separated batch sizes (default: "
                   f"{','.join(map(str, BATCHES))}; with --sweep: "
                   f"{','.join(map(str, SWEEP_BATCHES))})")
    p.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16")
    p.add_argument("--check", action="store_true",
                   help="run the equivalence matrix (issue 4 shapes, batch 1/2/7/16/64, fp16 "
                        "and bf16) instead of the timing table")
    p.add_argument("--sweep", nargs="?", const=",".join(SWEEP_SHAPES), metavar="OUTxIN,...",
                   help=f"time launch configurations at these shapes (default "
                        f"{','.join(SWEEP_SHAPES)}) and batches")
    p.add_argument("--no-layer", action="store_true", help="skip the whole-layer rows")
    p.add_argument("--tenants", metavar="N,N,...",
                   help=f"run the multi-tenant scenario instead of the table, for these tenant "
                        f"counts (e.g. {','.join(map(str, TENANTS))}), on the first of --models")
    p.add_argument("--ceiling", action="store_true",
                   help="time a bare read-only launch at 1–32 MB instead of the table: the "
                        "streaming ceiling of one launch")
    p.add_argument("--profile", metavar="OUTxIN",
                   help="only run the kernels at this shape (first of --batches) four times, "
                        "as a workload for ncu or nsys")
    p.add_argument("--json", help="also write every number to this JSON file")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    batches = [int(b) for b in (args.batches or ",".join(
        map(str, SWEEP_BATCHES if args.sweep else BATCHES))).split(",")]
    out = {"versions": versions_line(device), "argv": sys.argv[1:]}
    print(out["versions"])
    if (args.check or args.ceiling or args.profile or args.sweep) and device.type != "cuda":
        print("--check, --ceiling, --profile and --sweep need CUDA")
        return 2
    if args.profile:
        profile_workload(parse_shape(p, "--profile", args.profile), batches[0], dtype, device)
        return 0
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        l2 = getattr(props, "L2_cache_size", 50 * 2**20)
        out["copy_gbs"] = copy_bandwidth()
        print(f"copy bandwidth (read + write): {out['copy_gbs']:.0f} GB/s; "
              f"L2 {l2 / 2**20:.0f} MiB; {props.multi_processor_count} SMs")
    if args.check:
        out["check"] = check(CHECK_SHAPES, (1, 2, 7, 16, 64), (torch.float16, torch.bfloat16),
                             device)
    elif args.tenants:
        counts = [int(n) for n in args.tenants.split(",")]
        if device.type == "cuda":
            name = args.models.split(",")[0]
            out["tenants"] = tenant_rows(name, MODELS[name], counts, dtype, device,
                                         out["copy_gbs"])
        else:
            print("CPU: no CUDA device, so the reference (a loop over tenants) and dense only, "
                  "at a small shape")
            name = next(iter(CPU_MODELS))
            out["tenants"] = tenant_rows(name, CPU_MODELS[name], counts, torch.float32, device,
                                         None)
    elif args.ceiling:
        out["ceiling"] = streaming_ceiling((1, 2, 4, 8, 16, 32), device, l2, out["copy_gbs"])
    elif args.sweep:
        shapes = [parse_shape(p, "--sweep", v) for v in args.sweep.split(",")]
        out["sweep"] = sweep(shapes, batches, dtype, device, l2)
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
    rows = out.get("rows", []) + out.get("tenants", {}).get("rows", [])
    return 1 if any(r.get("fail") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
