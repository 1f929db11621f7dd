"""Timing of the delta path at real LLM layer shapes, against the memory-bandwidth limit.

For each layer shape of MODELS and each batch size, a delta is compressed at the default
1/16 budget (deltacome's greedy allocation on a synthetic long-tailed delta, so the bands
look like real ones), checked against the PyTorch reference, then timed four ways:

    dense      x @ Wᵀ with the fp16 weight: what the base layer costs
    reference  delta_matmul_reference: dequantize Û, V̂, two matmuls
    simple     delta_matmul(backend="simple"): the simple Triton kernel on the stored codes
               (two launches per band)
    triton     delta_matmul on the packed codes: the tuned kernels (two launches)

and reported as time, effective GB/s on the packed bytes (every stored byte: codes, scales,
zeros, σ), % of the device copy bandwidth measured in the same run, speed-up over the
reference and over the simple kernel (what the tuned kernels' techniques buy together), and
delta/dense time. A whole-layer row per model runs all 7 projections of one transformer
block in sequence in one CUDA graph, base only vs base + delta, the delta with each serving
option (kernel.serving_options: plain, fused launches for q/k/v and gate/up, the delta
beside the base GEMM on a side stream, both).

Multi-tenant (--tenants 1,4,16,64): one token for each of N tenants (full fine-tunes of one
base) through the 7 projections of one block and through the vocabulary ends (embedding
lookup and lm_head, each tenant's own deltas), three ways: (a) N separate fp16 models, (b) the
base's work for the batch plus a loop of single-tenant deltas, (c) the base's work plus one
batched delta per matrix; then the whole model composed as layers × block + vocabulary.
Reported as time, tokens/s, GB/s on the bytes each way must read, and the memory per tenant,
from which how many fine-tunes fit beside one base in 80 GB.

End to end (--decode): greedy decoding through a Llama-2-7B-shaped transformers model
with random fp16 weights (built on the GPU) and a synthetic 1/16 delta for every projection
of every block, prompt 128 tokens, 256 new ones, batch 1, 4 and 16, each decode step one
CUDA-graph replay: the base model alone (the floor), base + patched deltas with each serving
option, and the merged model; N tenants (one sequence each) against N separate fp16 models;
one 7B and one 70B block with each serving option; with --pair, a real base, delta file and
merged checkpoint decoded side by side (share of greedy tokens that agree). Each section runs
on its own (an error is printed and recorded, the next one runs); --json is rewritten as
results come.

Timing: every measured call is captured in a CUDA graph (launch gaps as in a served forward
pass) and replayed with triton.testing.do_bench, median. Each measurement cycles through
enough distinct copies of the operands to exceed the L2 cache twice, so small deltas are
read from HBM, not from L2, and one graph holds at least 16 calls, so the replay's own fixed
cost is spread as over a model's forward pass (see time_us). do_bench also clears L2
between replays.

Usage:
    python bench.py                      # full table (CUDA), or a small CPU table
    python bench.py --check              # correctness at awkward and real shapes, fp16/bf16
    python bench.py --models llama-2-7b --batches 1,16 --json runs/bench.json
    python bench.py --tenants 1,4,16,64 --models llama-2-7b      # multi-tenant scenario
    python bench.py --ceiling            # what one bare read-only launch streams
    python bench.py --sweep 4096x4096 --batches 2   # launch configurations vs choose_config
    python bench.py --decode --json runs/decode.json       # end to end (CUDA; tiny on CPU)
    python bench.py --decode --sections pair --pair BASE DELTA MERGED   # served vs merged
    ncu --kernel-name regex:"_[uv]_kernel" --launch-skip 4 --launch-count 2 \
        python bench.py --profile 28672x8192 --batches 1       # profile the third call
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import os
import platform
import sys
import time

import torch
import triton
import triton.language as tl

from deltacome import (LLAMA_MODULES, Config, block_shapes, compress_matrix,
                       decompress_matrix, synthetic_delta)
from kernel import (FMA_ROWS, DeltaLinear, ModelPatch, MultiDeltaLinear, block_rows,
                    choose_config, delta_matmul, delta_matmul_reference, embedding_delta,
                    embedding_delta_reference, multi_delta_matmul, multi_delta_matmul_reference,
                    patch_model, plan_tenants, prepare_delta, prepare_embedding_deltas, prepare_multi_delta,
                    replace_linear, serving_options, use_tenants)

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
LEVERS = {"plain": (False, False), "overlap": (False, True), "fuse": (True, False),
          "fuse+overlap": (True, True)}           # (fuse, overlap) of kernel.serving_options
DECODE_MODEL = "llama-2-7b"                       # --decode: the model section's shapes
DECODE_BLOCKS = ("llama-2-7b", "llama-2/3-70b")   # --decode: the block section's
DECODE_BATCHES = (1, 4, 16)
DECODE_TENANTS = (4, 16, 64)
DECODE_CPU = {"hidden": 64, "kv": 32, "inter": 172, "layers": 2, "vocab": 128}
SECTIONS = ("model", "tenants", "blocks", "pair")


def projections(m: dict) -> dict[str, tuple[int, int]]:
    return block_shapes(m["hidden"], m["kv"], m["inter"])


def unique_shapes(m: dict) -> list[tuple[int, int]]:
    return list(dict.fromkeys(projections(m).values()))


def progress(message: str):
    """A line on stderr saying what runs now: the tables on stdout stay clean, and a long
    set-up (compression, operand copies, bandwidth) does not look like a hang."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def make_delta(shape, device, seed=0, method="greedy", on_device=False):
    """A compressed synthetic long-tailed delta; SVD on `device` (randomized: only the kept
    vectors are needed, and the full SVD of 28672×8192 would dominate the run). on_device:
    draw the delta there too (its QR on a CPU takes seconds at 70B shapes; other random
    values than the CPU generator's, the same spectrum)."""
    progress(f"compressing a synthetic {shape[0]}x{shape[1]} delta ({method}, 1/16, {device})")
    gen = torch.Generator(device if on_device else "cpu").manual_seed(seed)
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
    calls. A replay has a fixed cost of its own, which a model's graphed forward pass pays
    once, not per matmul (measured in docs/PERFORMANCE.md). The copies are cycled in order,
    so an operand is read again only after all the others (more than 2× the L2 together,
    see `bench`)."""
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


def tolerance(dtype: torch.dtype) -> float:
    """The relative error (rel_err) a kernel's output may have against the reference in
    x's dtype: a few units of its roundoff."""
    return 2e-2 if dtype == torch.bfloat16 else 4e-3


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
# Correctness on the GPU, and the benchmark table.


def check(shapes, batches, dtypes, device) -> list[dict]:
    """The tuned kernels vs the reference in the same dtype and vs the fp32 reference
    (≈ exact); the simple kernel vs the fp32 reference."""
    rows = []
    print(f"{'shape':>12} {'bands':<22}{'dtype':>9}{'batch':>6}{'max|Δ| vs ref':>15}"
          f"{'rel vs ref':>12}{'rel vs fp32':>13}{'ref rel fp32':>14}{'simple rel fp32':>17}")
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
                simple = delta_matmul(x, cm, backend="simple")
                row = dict(shape=list(shape), bands=bands, dtype=str(dtype)[6:], batch=B,
                           max_abs=float((y.float() - ref.float()).abs().max()),
                           max_ref=float(ref.float().abs().max()),
                           rel_vs_ref=rel_err(y, ref), rel_vs_fp32=rel_err(y, exact),
                           ref_rel_vs_fp32=rel_err(ref, exact),
                           simple_rel_vs_fp32=rel_err(simple, exact))
                rows.append(row)
                print(f"{'x'.join(map(str, shape)):>12} {bands:<22}{row['dtype']:>9}{B:>6}"
                      f"{row['max_abs']:>15.3e}{row['rel_vs_ref']:>12.2e}"
                      f"{row['rel_vs_fp32']:>13.2e}{row['ref_rel_vs_fp32']:>14.2e}"
                      f"{row['simple_rel_vs_fp32']:>17.2e}", flush=True)
    return rows


def bench(models, batches, dtype, device, l2_bytes: int, copy_gbs: float | None,
          config_fn=None) -> list[dict]:
    cuda = device.type == "cuda"
    rows = []
    header = (f"{'model':<15}{'shape':>12} {'bands':<20}{'B':>3}{'MB':>7}{'dense µs':>10}"
              f"{'ref µs':>10}" + (f"{'simple µs':>10}{'triton µs':>10}{'GB/s':>8}{'%copy':>7}"
                                   f"{'×ref':>7}{'×simple':>8}{'Δ/dense':>8}" if cuda else ""))
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
                    tol = tolerance(dtype)
                    y = delta_matmul(x, kds[0], backend="triton", config=config)
                    row["rel_err_vs_ref"] = rel_err(y, ref)
                    row["simple_rel_err_vs_ref"] = rel_err(
                        delta_matmul(x, cm, backend="simple"), ref)
                    for name in ("rel_err_vs_ref", "simple_rel_err_vs_ref"):
                        if not row[name] < tol:
                            print(f"FAIL {model} {shape} B={B}: {name} {row[name]:.2e}")
                            row["fail"] = True
                row["dense_us"] = time_us([lambda W=W: x @ W.mT for W in Ws], graph=cuda) \
                    if cuda else cpu_time_us(lambda: x @ Ws[0].mT)
                row["ref_us"] = time_us([lambda c=c: delta_matmul_reference(x, c)
                                         for c in cms[:4]], graph=False) \
                    if cuda else cpu_time_us(lambda: delta_matmul_reference(x, cm))
                line = (f"{model:<15}{'x'.join(map(str, shape)):>12} {bands:<20}{B:>3}"
                        f"{nbytes / 1e6:>7.2f}{row['dense_us']:>10.1f}{row['ref_us']:>10.1f}")
                if cuda:
                    row["simple_us"] = time_us(
                        [lambda c=c: delta_matmul(x, c, backend="simple") for c in cms],
                        graph=True)
                    row["triton_us"] = time_us(
                        [lambda k=k: delta_matmul(x, k, backend="triton", config=config)
                         for k in kds], graph=True)
                    row["gbs"] = nbytes / (row["triton_us"] * 1e-6) / 1e9
                    row["pct_copy"] = 100 * row["gbs"] / copy_gbs
                    row["speedup_vs_ref"] = row["ref_us"] / row["triton_us"]
                    row["speedup_vs_simple"] = row["simple_us"] / row["triton_us"]
                    row["delta_over_dense"] = row["triton_us"] / row["dense_us"]
                    line += (f"{row['simple_us']:>10.1f}{row['triton_us']:>10.1f}"
                             f"{row['gbs']:>8.0f}{row['pct_copy']:>7.1f}"
                             f"{row['speedup_vs_ref']:>7.1f}{row['speedup_vs_simple']:>8.1f}"
                             f"{row['delta_over_dense']:>8.3f}")
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


def projection_block(m: dict, device, dtype) -> torch.nn.Module:
    """The 7 projections of one Llama block as nn.Linear modules under transformers' names
    (self_attn.q_proj, ..., mlp.down_proj), random weights N(0, 0.02)."""
    block = torch.nn.Module()
    for kind, (o, i) in projections(m).items():
        parent, _, child = LLAMA_MODULES[kind].rpartition(".")
        if not hasattr(block, parent):
            setattr(block, parent, torch.nn.Module())
        layer = torch.nn.Linear(i, o, bias=False, device=device, dtype=dtype)
        torch.nn.init.normal_(layer.weight, 0, 0.02)
        setattr(getattr(block, parent), child, layer)
    return block.requires_grad_(False)


def block_calls(block: torch.nn.Module, xs: dict) -> list:
    """(layer, input) of the block's projections in the order a Llama block calls them: q, k
    and v on one input tensor, o on another, gate and up on a third, down on a fourth."""
    attn, mlp = block.self_attn, block.mlp
    return [(attn.q_proj, xs["attn"]), (attn.k_proj, xs["attn"]), (attn.v_proj, xs["attn"]),
            (attn.o_proj, xs["o"]), (mlp.gate_proj, xs["mlp"]), (mlp.up_proj, xs["mlp"]),
            (mlp.down_proj, xs["down"])]


def run_block(block: torch.nn.Module, xs: dict) -> list[torch.Tensor]:
    return [layer(x) for layer, x in block_calls(block, xs)]


def layer_rows(models, batches, dtype, device, cache, levers=tuple(LEVERS)) -> list[dict]:
    """All 7 projections of one block in sequence, one CUDA graph: base only vs base + delta
    (Triton, base output fused), the delta with each of the serving options (`levers`, see
    kernel.serving_options: fused launches for q/k/v and gate/up, the delta beside the base
    GEMM on a side stream). One block's fp16 weights exceed L2 many times over."""
    rows = []
    print(f"\n{'whole layer':<15}{'':>23}{'base + Δ µs, by serving option':^{13 * len(levers)}}"
          f"  {'Δ / base':^{13 * len(levers)}}")
    print(f"{'':<15}{'B':>3}{'delta MB':>10}{'base µs':>10}"
          + "".join(f"{lv:>13}" for lv in levers) + "  " + "".join(f"{lv:>13}" for lv in levers))
    for model, m in models.items():
        block = projection_block(m, device, dtype)
        hidden, inter = m["hidden"], m["inter"]
        deltas = {kind: cache[s] if s in cache else make_delta(s, device)
                  for kind, s in projections(m).items()}
        nbytes = sum(cm.nbytes() for cm in deltas.values())
        for B in batches:
            xs = {k: torch.randn(B, n, device=device).to(dtype)
                  for k, n in (("attn", hidden), ("o", hidden), ("mlp", hidden),
                               ("down", inter))}
            unpatch(block)
            t_base = time_us([lambda: run_block(block, xs)], graph=True)
            patch_synthetic(block, {f"{LLAMA_MODULES[kind]}.weight": cm
                                    for kind, cm in deltas.items()}, "auto")
            want = [layer.base(x).float() + delta_matmul_reference(x.float(), layer.delta)
                    for layer, x in block_calls(block, xs)]         # correctness first
            times, errs = {}, {}
            for lever in levers:
                serving_options(block, *LEVERS[lever])
                errs[lever] = max(rel_err(y, w) for y, w in zip(run_block(block, xs), want))
                if not errs[lever] < tolerance(dtype):
                    print(f"FAIL whole layer {model} B={B} {lever}: rel. error "
                          f"{errs[lever]:.2e}")
                times[lever] = time_us([lambda: run_block(block, xs)], graph=True)
            plain = times.get("plain")
            row = dict(model=model, batch=B, delta_bytes=nbytes, base_us=t_base,
                       levers={lv: dict(us=t, delta_us=t - t_base,
                                        delta_over_base=(t - t_base) / t_base,
                                        rel_err=errs[lv])
                               for lv, t in times.items()})
            row["fail"] = any(not e < tolerance(dtype) for e in errs.values())
            if plain is not None:
                row.update(base_plus_delta_us=plain, delta_us=plain - t_base,
                           delta_over_base=(plain - t_base) / t_base)
            rows.append(row)
            print(f"{model:<15}{B:>3}{nbytes / 1e6:>10.1f}{t_base:>10.1f}"
                  + "".join(f"{times[lv]:>13.1f}" for lv in levers) + "  "
                  + "".join(f"{row['levers'][lv]['delta_over_base']:>13.3f}" for lv in levers),
                  flush=True)
    return rows


# ----------------------------------------------------------------------------------------------
# Multi-tenant serving: N fine-tunes of one base, one token each, one block.


def model_fp16_bytes(m: dict) -> int:
    """fp16 bytes of the whole model: every block's 7 projections, the embedding and the
    lm_head (norms: a few hidden-sized vectors, left out)."""
    block = sum(o * i for o, i in projections(m).values())
    return 2 * (m["layers"] * block + 2 * m["vocab"] * m["hidden"])


WAYS = ("separate", "loop", "batched")


def block_ways(m: dict, N: int, cms: dict, kds: dict, Ws: dict, dtype, device) -> tuple:
    """One token for each of N tenants (row t = tenant t, rows sorted) through the 7
    projections of one block, in one CUDA graph per way:

        (a) separate  N fp16 models: N GEMVs on N distinct weights per projection
        (b) loop      base GEMM (batch N) + N single-delta kernels (delta_matmul, batch 1)
        (c) batched   base GEMM (batch N) + one multi_delta_matmul (one launch pair)

    Returns ({way: µs}, {way: bytes that must be read}, failed). Bytes: (a) N × the block's
    fp16 weights; (b), (c) the base once plus each tenant's packed delta once. On CPU: the
    reference (a loop over tenants) instead of the kernels."""
    cuda = device.type == "cuda"
    projs = projections(m)
    xs = {p: torch.randn(N, s[1], device=device).to(dtype) for p, s in projs.items()}
    idx = torch.arange(N)
    base_bytes = sum(2 * o * i for o, i in projs.values())
    tenant_bytes = sum(cms[p][0].nbytes() for p in projs)
    must = {"separate": N * base_bytes, "loop": base_bytes + N * tenant_bytes,
            "batched": base_bytes + N * tenant_bytes}
    fail = False
    Wn = {p: [Ws[p]] + [torch.empty_like(Ws[p]).normal_(0, 0.02) for _ in range(N - 1)]
          for p in projs}                                               # N distinct weights
    if cuda:
        mds = {p: prepare_multi_delta(cms[p][:N], device) for p in projs}
        plan = plan_tenants(idx, N, device)
        for p in projs:                                                 # correctness first
            y = multi_delta_matmul(xs[p], mds[p], plan=plan, backend="triton")
            err = rel_err(y, multi_delta_matmul_reference(xs[p], cms[p][:N], idx))
            if not err < tolerance(dtype):
                print(f"FAIL tenants {p} N={N}: rel. error {err:.2e}")
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
                multi_delta_matmul(xs[p], mds[p], None, xs[p] @ Ws[p].mT, backend="triton",
                                   plan=plan)
        times = {w: time_us([f], graph=True) for w, f in zip(WAYS, (separate, loop, batched))}
    else:
        times = {
            "separate": cpu_time_us(lambda: [xs[p][t:t + 1] @ Wn[p][t].mT
                                             for p in projs for t in range(N)]),
            "loop": cpu_time_us(lambda: [xs[p] @ Ws[p].mT + multi_delta_matmul_reference(
                xs[p], cms[p][:N], idx) for p in projs])}
    return times, must, fail


def lookup_bytes(cm) -> int:
    """Bytes one embedding lookup of a compressed delta must read: V̂ (codes, scales, zeros)
    and S whole, and per vector one word, scale and zero of Û at the token."""
    return sum(b.V.codes.nbytes + b.V.scale.nbytes + b.V.zero.nbytes + b.S.nbytes + 8 * b.rank
               for b in cm.bands)


def vocab_ways(N: int, heads: list, embeds: list, W_head, E, dtype, device) -> tuple:
    """One token for each of N tenants through the vocabulary ends of the model: the embedding
    lookup and lm_head (untied, vocabulary × hidden), in one CUDA graph per way:

        (a) separate  N fp16 models: N lookups (a row each, from one table: a row costs
                      the same from any table), N GEMVs on N distinct lm_heads
        (b) loop      base lookup and head GEMM (batch N) + per tenant its embedding delta
                      (embedding_delta, one tenant) and head delta (delta_matmul, batch 1)
        (c) batched   base lookup and head GEMM + one embedding_delta over all tenants + one
                      multi_delta_matmul for the heads

    Every tenant's embedding delta is compressed (what a tied embedding needs; an untied one
    stores its changed rows when fewer bytes, and its lookup is then one sorted search).
    Returns ({way: µs}, {way: bytes that must be read}, failed)."""
    cuda = device.type == "cuda"
    vocab, hidden = W_head.shape
    x = torch.randn(N, hidden, device=device).to(dtype)
    ids = torch.randint(0, vocab, (N,), device=device)
    idx = torch.arange(N, device=device)
    must = {"separate": N * (2 * vocab * hidden + 2 * hidden),
            "loop": 2 * vocab * hidden + N * 2 * hidden
            + sum(h.nbytes() + lookup_bytes(e) for h, e in zip(heads[:N], embeds[:N]))}
    must["batched"] = must["loop"]
    fail = False
    plan = plan_tenants(idx.cpu(), N, device)
    if cuda:
        table = prepare_embedding_deltas(embeds[:N], device, dtype)
        heads_n = [W_head] + [torch.empty_like(W_head).normal_(0, 0.02) for _ in range(N - 1)]
        md = prepare_multi_delta(heads[:N], device)
        kds = [prepare_delta(h, device) for h in heads[:N]]
        tables = [prepare_embedding_deltas([e], device, dtype) for e in embeds[:N]]
        one = plan_tenants(torch.zeros(1, dtype=torch.int64), 1, device)
        zero = torch.zeros(1, dtype=torch.int64, device=device)
        y = multi_delta_matmul(x, md, plan=plan, backend="triton")      # correctness first
        err = rel_err(y, multi_delta_matmul_reference(x, heads[:N], idx.cpu()))
        e = embedding_delta(ids, idx, table, plan)
        want = torch.cat([embedding_delta_reference(ids[t:t + 1], embeds[t], dtype)
                          for t in range(N)])
        err = max(err, rel_err(e, want))
        if not err < tolerance(dtype):
            print(f"FAIL tenants vocab N={N}: rel. error {err:.2e}")
            fail = True

        def separate():
            for t in range(N):
                E[ids[t:t + 1]]
                x[t:t + 1] @ heads_n[t].mT

        def loop():
            e = E[ids]
            y = x @ W_head.mT
            for t in range(N):
                e[t:t + 1] += embedding_delta(ids[t:t + 1], zero, tables[t], one)
                delta_matmul(x[t:t + 1], kds[t], y[t:t + 1], backend="triton")

        def batched():
            E[ids] + embedding_delta(ids, idx, table, plan)
            multi_delta_matmul(x, md, None, x @ W_head.mT, backend="triton", plan=plan)
        times = {w: time_us([f], graph=True) for w, f in zip(WAYS, (separate, loop, batched))}
    else:
        times = {
            "separate": cpu_time_us(lambda: [(E[ids[t:t + 1]], x[t:t + 1] @ W_head.mT)
                                             for t in range(N)]),
            "loop": cpu_time_us(lambda: (E[ids] + torch.cat([embedding_delta_reference(
                ids[t:t + 1], embeds[t], dtype) for t in range(N)]), x @ W_head.mT
                + multi_delta_matmul_reference(x, heads[:N], idx)))}
    return times, must, fail


def tenant_rows(model: str, m: dict, tenant_counts, dtype, device, copy_gbs) -> dict:
    """Serving N full fine-tunes of one base, one token each (block_ways, vocab_ways), as
    three tables: one block (the 7 projections), the vocabulary ends (embedding lookup and
    lm_head, with every tenant's own deltas), and the whole model, composed as
    layers × block + vocabulary (what one decoding step of N tokens costs; norms are
    N × hidden per layer, left out). Tenant deltas are copies_of one compressed delta per
    shape (same band layout, fresh random codes: timing does not depend on the values)."""
    cuda = device.type == "cuda"
    projs = projections(m)
    n_max = max(tenant_counts)
    protos = {s: make_delta(s, device) for s in unique_shapes(m)}
    cms = {p: copies_of(protos[s], n_max) for p, s in projs.items()}         # p -> N deltas
    Ws = {p: (torch.randn(s, device=device) * 0.02).to(dtype) for p, s in projs.items()}
    kds = {p: [prepare_delta(c, device) for c in cms[p]] for p in projs} if cuda else {}
    vshape = (m["vocab"], m["hidden"])
    heads = copies_of(make_delta(vshape, device, seed=1), n_max)
    embeds = copies_of(make_delta(vshape, device, seed=2), n_max)
    W_head = (torch.randn(vshape, device=device) * 0.02).to(dtype)
    E = (torch.randn(vshape, device=device) * 0.02).to(dtype)
    rows = []
    print(f"\n{'tenants':<15}{'N':>4} {'part':<7}{'way':<13}{'MB read':>10}{'µs':>10}"
          f"{'tokens/s':>11}{'GB/s':>8}" + (f"{'%copy':>7}{'×(a)':>7}{'×(b)':>7}" if cuda else ""))
    for N in tenant_counts:
        parts = {"block": block_ways(m, N, cms, kds, Ws, dtype, device)}
        if cuda:
            torch.cuda.empty_cache()                  # N × the block's weights: freed now
        parts["vocab"] = vocab_ways(N, heads, embeds, W_head, E, dtype, device)
        if cuda:
            torch.cuda.empty_cache()
        (tb, mb, fb), (tv, mv, fv) = parts["block"], parts["vocab"]
        parts["model"] = ({w: m["layers"] * tb[w] + tv[w] for w in tb},
                          {w: m["layers"] * mb[w] + mv[w] for w in tb}, fb or fv)
        for part, (times, must, fail) in parts.items():
            for way, us in times.items():
                row = dict(model=model, tenants=N, part=part, way=way, bytes_read=must[way],
                           us=us, tokens_per_s=N / (us * 1e-6), gbs=must[way] / (us * 1e-6) / 1e9,
                           backend="triton" if cuda else "reference (CPU)", fail=fail)
                line = (f"{model:<15}{N:>4} {part:<7}{way if cuda else way + ' ref':<13}"
                        f"{must[way] / 1e6:>10.1f}{us:>10.1f}{row['tokens_per_s']:>11.0f}"
                        f"{row['gbs']:>8.0f}")
                if cuda:
                    row["pct_copy"] = 100 * row["gbs"] / copy_gbs
                    row["x_separate"] = times["separate"] / us
                    row["x_loop"] = times["loop"] / us
                    line += (f"{row['pct_copy']:>7.1f}{row['x_separate']:>7.2f}"
                             f"{row['x_loop']:>7.2f}")
                print(line, flush=True)
                rows.append(row)
    tenant_bytes = sum(cms[p][0].nbytes() for p in projs)
    device_bytes = sum(prepare_multi_delta(cms[p][:1], device).device_bytes[0] for p in projs)
    table = prepare_embedding_deltas(embeds[:1], device, dtype)
    vocab_bytes = heads[0].nbytes() + embeds[0].nbytes()
    vocab_device = (prepare_multi_delta(heads[:1], device).device_bytes[0]
                    + sum(t.nbytes for t in (table.words, table.scale, table.zero))
                    + table.V[0].nbytes)
    memory = dict(model=model, block_fp16_bytes=sum(2 * o * i for o, i in projs.values()),
                  tenant_block_bytes=tenant_bytes, tenant_block_device_bytes=device_bytes,
                  tenant_vocab_bytes=vocab_bytes, tenant_vocab_device_bytes=vocab_device,
                  model_fp16_bytes=model_fp16_bytes(m),
                  tenant_model_bytes=m["layers"] * tenant_bytes + vocab_bytes,
                  tenant_model_device_bytes=m["layers"] * device_bytes + vocab_device)
    spare = HBM_BYTES - memory["model_fp16_bytes"]
    memory["fit_delta_tenants"] = max(0, int(spare // memory["tenant_model_device_bytes"]))
    memory["fit_fp16_finetunes"] = max(0, int(spare // memory["model_fp16_bytes"]))
    print(f"memory per tenant: {tenant_bytes / 1e6:.2f} MB per block stored "
          f"({device_bytes / 1e6:.2f} MB in the kernels' layout), embedding and lm_head deltas "
          f"{vocab_bytes / 1e6:.2f} MB ({vocab_device / 1e6:.2f} MB as served: V̂ of the "
          f"embedding in {str(dtype)[6:]}), {memory['tenant_model_device_bytes'] / 1e6:.1f} MB "
          f"per {m['layers']}-block fine-tune as served, vs "
          f"{memory['model_fp16_bytes'] / 1e6:.1f} MB per fp16 model")
    print(f"beside one fp16 base in {HBM_BYTES / 1e9:.0f} GB (weights only): "
          f"{memory['fit_delta_tenants']} compressed fine-tunes, or "
          f"{memory['fit_fp16_finetunes']} fp16 fine-tunes", flush=True)
    return dict(rows=rows, memory=memory)


# ----------------------------------------------------------------------------------------------
# End-to-end decode (--decode): tokens/s of greedy generation by a Llama model served from
# compressed deltas (base + patch_model's DeltaLinear layers), against the merged fp16 model
# and the base model alone (the floor); N tenants (patch_model_tenants' MultiDeltaLinear,
# one sequence each) against N separate fp16 models; a real base/delta/merged triple's
# greedy tokens, served against merged.
#
# The decode loop is written here, not taken from transformers' generate(), whose cache and
# masking APIs change between releases: a static KV cache and one step function (embedding,
# blocks, norm, lm_head, argmax) over the modules' stable parts (norms, projections, rotary
# embedding, MLP). Every model runs through the same loop with each step replayed from one
# CUDA graph, so launch overhead counts alike for all of them.


def llama_model(m: dict, device, dtype, seed: int = 0):
    """A transformers LlamaForCausalLM of shape m (MODELS' keys; heads of 128 dimensions, or
    of hidden/4 below 512) with random weights N(0, 0.02) and unit norms, made directly on
    `device` in `dtype`: no checkpoint, no fp32 copy."""
    from transformers import LlamaConfig, LlamaForCausalLM
    head = min(128, m["hidden"] // 4)
    config = LlamaConfig(vocab_size=m["vocab"], hidden_size=m["hidden"],
                         intermediate_size=m["inter"], num_hidden_layers=m["layers"],
                         num_attention_heads=m["hidden"] // head,
                         num_key_value_heads=m["kv"] // head, max_position_embeddings=4096,
                         tie_word_embeddings=False)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    gen = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():           # (the library's own init varies by release)
            if p.ndim == 2:
                p.normal_(0, 0.02, generator=gen)
            else:
                p.fill_(1.0)
    return model.eval().requires_grad_(False)


def synthetic_deltas(m: dict, protos: dict) -> dict:
    """A compressed delta for every projection of every block, by checkpoint name: copies
    of protos[shape] (copies_of: its bands, scales and S, fresh random codes), so that every
    matrix reads bytes of its own, as a real fine-tune's do."""
    deltas = {}
    for kind, shape in projections(m).items():
        for i, cm in enumerate(copies_of(protos[shape], m["layers"])):
            deltas[f"model.layers.{i}.{LLAMA_MODULES[kind]}.weight"] = cm
    return deltas


def prototypes(m: dict, device, cache: dict) -> dict:
    """shape -> one compressed synthetic delta (make_delta, drawn on `device`), made once
    per shape (cache)."""
    for shape in unique_shapes(m):
        if shape not in cache:
            cache[shape] = make_delta(shape, device, on_device=True)
    return {shape: cache[shape] for shape in unique_shapes(m)}


def patch_synthetic(model, deltas: dict, backend: str, tenants: int = 0) -> None:
    """Patch `model` in place with deltas (name -> CompressedMatrix), as patch_model does
    from a file: DeltaLinear layers; with tenants > 0, as patch_model_tenants does:
    MultiDeltaLinear layers holding the same delta for every tenant (each tenant's copy is
    bytes of its own in the kernels' layout)."""
    patch = ModelPatch(model, "synthetic deltas")
    for name, cm in deltas.items():
        if tenants:
            replace_linear(patch, name, lambda layer, cm=cm: MultiDeltaLinear(
                layer, [cm] * tenants, backend))
        else:
            replace_linear(patch, name, lambda layer, cm=cm: DeltaLinear(layer, cm, backend))
    patch.commit()


def unpatch(model) -> None:
    """Every DeltaLinear / MultiDeltaLinear of `model` back to its base nn.Linear (out of its
    group first: a group and its layers refer to each other, and their layouts would wait
    for the garbage collector)."""
    for name, layer in list(model.named_modules()):
        if isinstance(layer, (DeltaLinear, MultiDeltaLinear)):
            layer.group = None
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, layer.base)


def merge_deltas(model) -> None:
    """A patched model -> its merged fine-tune, in place: W ← W + Δ̂ in fp32, rounded once
    to W's dtype (as deltacome.apply does), and the base Linear layers back."""
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, DeltaLinear):
                w = layer.base.weight
                w.copy_((w.float() + decompress_matrix(layer.delta.to(w.device))).to(w.dtype))
    unpatch(model)


def rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of t (B, heads, T, d) at cos, sin (B, T, d)."""
    half = t.shape[-1] // 2
    turned = torch.cat((-t[..., half:], t[..., :half]), -1)
    return t * cos[:, None] + turned * sin[:, None]


def attention(attn, x, cos, sin, k_cache, v_cache, slots, mask) -> torch.Tensor:
    """A Llama attention module on x (B, T, hidden): its q, k, v projections (patched layers
    when served), rotary embedding, k and v written to cache columns `slots` (T,), scaled
    dot-product attention over the whole cache (B, Hkv, L, d) under mask (B, 1, T, L), o."""
    B, T, _ = x.shape
    d = attn.head_dim
    q = attn.q_proj(x).view(B, T, -1, d).transpose(1, 2)                  # (B, H, T, d)
    k = attn.k_proj(x).view(B, T, -1, d).transpose(1, 2)                  # (B, Hkv, T, d)
    v = attn.v_proj(x).view(B, T, -1, d).transpose(1, 2)
    q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    k_cache.index_copy_(2, slots, k)
    v_cache.index_copy_(2, slots, v)
    o = torch.nn.functional.scaled_dot_product_attention(
        q, k_cache, v_cache, attn_mask=mask, scale=attn.scaling,
        enable_gqa=q.shape[1] != k.shape[1])                               # (B, H, T, d)
    return attn.o_proj(o.transpose(1, 2).reshape(B, T, -1))


def llama_forward(model, ids, positions, slots, mask, k_cache, v_cache,
                  last: bool = True) -> torch.Tensor:
    """ids (B, T) at rotary positions (B, T), their keys and values to cache columns slots
    (T,), attending under mask (B, 1, T, L) -> logits (B, 1, vocab) of the last position,
    or (B, T, vocab) of all."""
    inner = model.model
    h = inner.embed_tokens(ids)                                             # (B, T, hidden)
    cos, sin = inner.rotary_emb(h, positions)                               # (B, T, d)
    for layer, kc, vc in zip(inner.layers, k_cache, v_cache):
        h = h + attention(layer.self_attn, layer.input_layernorm(h), cos, sin, kc, vc, slots,
                          mask)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.lm_head(inner.norm(h[:, -1:] if last else h))


class Decoder:
    """Greedy decoding of a batch of left-padded prompts (B, T) (pad (B,) leading pad
    tokens each) with a static KV cache of T + new_tokens columns: prefill() runs the prompts
    and picks token 0; step() picks the next token, reading and writing only tensors made
    here, so capture() can record it in a CUDA graph; run() makes all new_tokens. tokens
    (B, new_tokens) holds the model's picks; with force set, each step feeds the next of
    `forced` instead of its own pick (teacher forcing) and still records its pick."""

    def __init__(self, model, prompts: torch.Tensor, pad: torch.Tensor, new_tokens: int):
        if new_tokens < 2:
            raise ValueError(f"new_tokens must be at least 2, got {new_tokens}")
        B, T = prompts.shape
        dev, cfg = prompts.device, model.config
        attn = model.model.layers[0].self_attn
        dtype = model.model.embed_tokens.weight.dtype
        L = T + new_tokens
        self.model, self.prompts, self.pad = model, prompts, pad.to(dev)
        self.T, self.n = T, new_tokens
        self.k = [torch.zeros(B, cfg.num_key_value_heads, L, attn.head_dim, dtype=dtype,
                              device=dev) for _ in model.model.layers]     # (B, Hkv, L, d)
        self.v = [torch.zeros_like(k) for k in self.k]
        self.keys = torch.arange(L, device=dev)                              # cache columns
        self.ids = torch.zeros(B, 1, dtype=torch.long, device=dev)         # the last token
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)            # its column
        self.tokens = torch.zeros(B, new_tokens, dtype=torch.long, device=dev)
        self.forced = torch.zeros_like(self.tokens)
        self.force = torch.zeros((), dtype=torch.bool, device=dev)
        self.logits = torch.zeros(B, cfg.vocab_size, dtype=dtype, device=dev)
        self.graph = None

    @property
    def cache_bytes(self) -> int:
        return kv_bytes(self.model, self.k[0].shape[0], self.k[0].shape[2])

    def _pick(self, logits: torch.Tensor, col: torch.Tensor) -> None:
        """Record the greedy pick of logits (B, vocab) in column col (1,) of tokens; feed it
        (or the forced token) to the next step."""
        pick = logits.argmax(-1)                                            # (B,)
        self.logits.copy_(logits)
        self.tokens.index_copy_(1, col, pick[:, None])
        fed = torch.where(self.force, self.forced.index_select(1, col)[:, 0], pick)
        self.ids.copy_(fed[:, None])

    @torch.no_grad()
    def prefill(self) -> None:
        T, keys = self.T, self.keys
        q = keys[:T]
        # query i sees keys j ≤ i past the padding, and itself (a pad query sees only itself)
        mask = (keys[None, None, :] <= q[None, :, None]) & (
            (keys[None, None, :] >= self.pad[:, None, None])
            | (keys[None, None, :] == q[None, :, None]))                    # (B, T, L)
        positions = (q[None, :] - self.pad[:, None]).clamp_min(0)           # (B, T)
        logits = llama_forward(self.model, self.prompts, positions, q, mask[:, None],
                               self.k, self.v)
        self._pick(logits[:, -1], self.pos.new_zeros(1))
        self.pos.fill_(T)

    @torch.no_grad()
    def step(self) -> None:
        positions = (self.pos - self.pad)[:, None]                          # (B, 1)
        mask = (self.keys <= self.pos) & (self.keys >= self.pad[:, None])   # (B, L)
        logits = llama_forward(self.model, self.ids, positions, self.pos,
                               mask[:, None, None], self.k, self.v)
        self._pick(logits[:, -1], self.pos - self.T + 1)
        self.pos.add_(1)

    def capture(self) -> None:
        """Record step() in a CUDA graph, after eager steps (kernels compiled, plans and
        workspaces made before capture). Leaves the state mid-way: run() prefills again."""
        self.prefill()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(min(2, self.n - 1)):         # (a step past the last token's
                self.step()                              #  column would index out of range)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.step()

    def run(self, steps: int | None = None, graph: bool | None = None) -> torch.Tensor:
        """Prefill, then `steps` steps (all new_tokens − 1 by default), replayed from the graph
        if captured (graph=None) -> tokens (B, new_tokens)."""
        self.prefill()
        graph = self.graph is not None if graph is None else graph
        for _ in range(self.n - 1 if steps is None else steps):
            self.graph.replay() if graph else self.step()
        return self.tokens


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_decode(dec: Decoder) -> float:
    """ms per decode step: a full run (prefill, new_tokens − 1 steps), timed from its second
    step (the first replay of a graph also uploads it)."""
    dec.prefill()
    dec.graph.replay() if dec.graph is not None else dec.step()
    synchronize(dec.pos.device)
    t0 = time.perf_counter()
    for _ in range(dec.n - 2):
        dec.graph.replay() if dec.graph is not None else dec.step()
    synchronize(dec.pos.device)
    return 1e3 * (time.perf_counter() - t0) / max(1, dec.n - 2)


def guarded(label: str, fn, *args):
    """fn(*args), or, if it raises, its traceback printed and returned as {"error": ...}: one
    configuration's failure does not end its section."""
    import traceback
    try:
        return fn(*args)
    except Exception:
        print(f"{label} failed:", flush=True)
        traceback.print_exc()
        return dict(error=traceback.format_exc())


def graph_vs_eager(dec: Decoder, steps: int = 8) -> dict:
    """The captured step against the eager one from the same prefill: share of equal
    tokens and the last logits' relative difference."""
    steps = min(steps, dec.n - 1)
    eager = dec.run(steps, graph=False)[:, :steps + 1].clone()
    eager_logits = dec.logits.clone()
    graphed = dec.run(steps, graph=True)[:, :steps + 1]
    return dict(steps=steps, tokens_equal=float((eager == graphed).float().mean()),
                logits_rel=rel_err(dec.logits, eager_logits))


def kernel_kind(name: str) -> str:
    """A profiled kernel's category by its name."""
    low = name.lower()
    if "_v_kernel" in low or "_u_kernel" in low:
        return "delta phase " + ("V" if "_v_kernel" in low else "U")
    if any(w in low for w in ("gemm", "gemv", "nvjet", "cutlass", "xmma", "splitk")):
        return "GEMM (cuBLAS)"
    if any(w in low for w in ("fmha", "flash", "attention", "softmax")):
        return "attention"
    return "other"


def profile_decode(dec: Decoder, steps: int = 16, top: int = 15) -> dict:
    """GPU time per decode step by kernel (torch.profiler over `steps` graph replays): the
    categories (kernel_kind) with their µs and launches a step, and the top kernels."""
    from torch.profiler import ProfilerActivity, profile
    dec.prefill()
    synchronize(dec.pos.device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            dec.graph.replay()
        synchronize(dec.pos.device)
    kernels = []
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", None)
        us = getattr(e, "self_cuda_time_total", 0) if us is None else us
        if us > 0:
            kernels.append(dict(name=e.key[:160], calls_per_step=e.count / steps,
                                us_per_step=us / steps, kind=kernel_kind(e.key)))
    kernels.sort(key=lambda k: -k["us_per_step"])
    kinds: dict = {}
    launches: dict = {}
    for k in kernels:
        kinds[k["kind"]] = kinds.get(k["kind"], 0.0) + k["us_per_step"]
        launches[k["kind"]] = launches.get(k["kind"], 0.0) + k["calls_per_step"]
    return dict(steps=steps, us_per_step=sum(kinds.values()), kinds=kinds, launches=launches,
                top=kernels[:top])


def model_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def kv_bytes(model, rows: int, length: int) -> int:
    """Bytes of a static KV cache of `length` positions for `rows` sequences."""
    attn, cfg = model.model.layers[0].self_attn, model.config
    size = model.model.embed_tokens.weight.element_size()
    return 2 * len(model.model.layers) * rows * cfg.num_key_value_heads * length * \
        attn.head_dim * size


def delta_bytes(model) -> int:
    """Stored bytes of the patched layers' deltas, every tenant's counted."""
    return sum(cm.nbytes() for layer in model.modules()
               if isinstance(layer, (DeltaLinear, MultiDeltaLinear))
               for cm in (layer.deltas if isinstance(layer, MultiDeltaLinear) else [layer.delta]))


def decode_row(dec: Decoder, graph: bool, rows: int, **fields) -> dict:
    """Capture (CUDA) and time one configuration -> its row: ms per token (one step for all
    rows of the batch), tokens/s, memory."""
    device = dec.pos.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    if graph:
        dec.capture()
    ms = time_decode(dec)
    row = dict(fields, batch=rows, ms_per_token=ms, tokens_per_s=rows * 1e3 / ms,
               weights_gb=model_bytes(dec.model) / 1e9, deltas_gb=delta_bytes(dec.model) / 1e9,
               kv_gb=dec.cache_bytes / 1e9, graph=graph,
               setup_s=time.perf_counter() - t0)
    if device.type == "cuda":
        row["peak_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return row


def print_decode_row(row: dict) -> None:
    what = row["way"] + (f" {row['lever']}" if row.get("lever") else "")
    n = row.get("tenants", "")
    print(f"{row['model']:<13}{what:<22}{n:>4}{row['batch']:>4}{row['ms_per_token']:>10.2f}"
          f"{row['tokens_per_s']:>11.0f}{row.get('x_merged', float('nan')):>9.3f}"
          f"{row.get('peak_gb', float('nan')):>9.1f}"
          f"{row.get('graph_vs_eager', {}).get('tokens_equal', float('nan')):>12.3f}",
          flush=True)


DECODE_HEADER = (f"{'decode':<13}{'way':<22}{'N':>4}{'B':>4}{'ms/token':>10}{'tokens/s':>11}"
                 f"{'×merged':>9}{'peak GB':>9}{'graph=eager':>12}")


def decode_model_rows(name: str, m: dict, batches, levers, prompt_len: int, new_tokens: int,
                      device, dtype, backend: str, cache: dict, save, profile: bool) -> list:
    """The model section: base alone, base + deltas (each serving option), merged; each at
    every batch, decoding the same random prompts. Rows are saved as they are made; the
    ratios to the merged model and token agreements are added at the end."""
    graph = device.type == "cuda"
    rows: list = []
    save(rows)
    model = llama_model(m, device, dtype)
    deltas = synthetic_deltas(m, prototypes(m, device, cache))
    gen = torch.Generator().manual_seed(1)
    prompts = {B: torch.randint(0, m["vocab"], (B, prompt_len), generator=gen).to(device)
               for B in batches}
    tokens = {}

    def measure(way, lever, B):
        dec = Decoder(model, prompts[B], torch.zeros(B, dtype=torch.long), new_tokens)
        row = decode_row(dec, graph, B, model=name, way=way, lever=lever)
        tokens[way, lever, B] = dec.tokens.clone()
        if graph and B == batches[0]:
            row["graph_vs_eager"] = graph_vs_eager(dec)
            if profile:
                row["profile"] = guarded("profile", profile_decode, dec)
        return row

    def add(way, lever, B):
        row = guarded(f"{way} {lever or ''} B={B}", measure, way, lever, B)
        rows.append(dict(row, model=name, way=way, lever=lever, batch=B))
        save(rows)
        if "error" not in row:
            print_decode_row(row)

    print(DECODE_HEADER)
    for B in batches:
        add("base", None, B)
    patch_synthetic(model, deltas, backend)
    for lever in levers:
        groups = serving_options(model, *LEVERS[lever])
        print(f"serving options {lever}: {groups} fused groups")
        for B in batches:
            add("served", lever, B)
    merge_deltas(model)
    for B in batches:
        add("merged", None, B)
    merged = {r["batch"]: r for r in rows if r["way"] == "merged" and "error" not in r}
    print("ratios to the merged model (×merged) and the share of greedy tokens equal to the "
          "merged model's (random weights: near-ties flip; the real pair is the check):")
    for r in rows:
        if "error" in r or r["batch"] not in merged:
            continue
        r["x_merged"] = r["ms_per_token"] / merged[r["batch"]]["ms_per_token"]
        r["tokens_vs_merged"] = float((tokens[r["way"], r["lever"], r["batch"]]
                                       == tokens["merged", None, r["batch"]]).float().mean())
        print(f"  {r['way']:<8}{r['lever'] or '':<14}B={r['batch']:<4}×merged "
              f"{r['x_merged']:.3f}  tokens equal {r['tokens_vs_merged']:.3f}")
    save(rows)
    print_profiles(rows)
    return rows


PROFILE_KINDS = ("GEMM (cuBLAS)", "delta phase V", "delta phase U", "attention", "other")


def print_profiles(rows: list) -> None:
    """The profiled rows of a decode section as one table: GPU µs per decode step by kernel
    kind, the delta kernels' launches per step, mean µs per launch, and the rate at which
    they read the stored deltas (GB/s)."""
    profiled = [r for r in rows if "error" not in r.get("profile", {"error": 1})]
    if not profiled:
        return
    print(f"\nGPU µs per decode step by kernel kind (torch.profiler, "
          f"{profiled[0]['profile']['steps']} graph replays):")
    print(f"  {'way':<28}" + "".join(f"{k:>15}" for k in PROFILE_KINDS)
          + f"{'total':>9}{'Δ launches':>12}{'µs/launch':>11}{'Δ GB/s':>8}")
    for r in profiled:
        p = r["profile"]
        delta = [k for k in p["kinds"] if k.startswith("delta")]
        launches = sum(p["launches"][k] for k in delta)
        us = sum(p["kinds"][k] for k in delta)
        per = us / launches if launches else float("nan")
        rate = r["deltas_gb"] * 1e6 / us if us else float("nan")
        what = r["way"] + (f" {r['lever']}" if r.get("lever") else "") + f" B={r['batch']}"
        print(f"  {what:<28}" + "".join(f"{p['kinds'].get(k, 0.0):>15.0f}"
                                       for k in PROFILE_KINDS)
              + f"{p['us_per_step']:>9.0f}{launches:>12.0f}{per:>11.1f}{rate:>8.0f}")


def decode_tenant_rows(name: str, m: dict, counts, levers, prompt_len: int, new_tokens: int,
                       copies: int, device, dtype, backend: str, cache: dict, save,
                       profile: bool) -> dict:
    """N tenants, one sequence each, through one patched model (MultiDeltaLinear; each
    serving option), against N separate fp16 models of the same shape (timing does not
    depend on the weights' values): `copies` of them decoded in turn, each at batch 1, as
    many as fit at most. N models decoded in turn give N tokens per N model steps, so their
    tokens/s is that of the copies measured, for any N that fits."""
    graph = device.type == "cuda"
    out = dict(rows=[])
    save(out)
    model = llama_model(m, device, dtype)
    deltas = synthetic_deltas(m, prototypes(m, device, cache))
    gen = torch.Generator().manual_seed(2)
    prompts = torch.randint(0, m["vocab"], (max(counts), prompt_len), generator=gen).to(device)
    print(DECODE_HEADER)

    def measure(N, lever):
        with use_tenants(model, torch.arange(N)) as batch:
            dec = Decoder(model, prompts[:N], torch.zeros(N, dtype=torch.long), new_tokens)
            dec.tenants = batch              # the graph reads its plans: keep them alive
            row = decode_row(dec, graph, N, model=name, way="tenants", lever=lever,
                             tenants=N)
            if graph and profile:
                row["profile"] = guarded("profile", profile_decode, dec)
            return row
    for N in counts:
        patch_synthetic(model, deltas, backend, tenants=N)
        for lever in levers:
            serving_options(model, *LEVERS[lever])
            row = guarded(f"tenants {lever} N={N}", measure, N, lever)
            out["rows"].append(dict(row, model=name, way="tenants", lever=lever, tenants=N))
            save(out)
            if "error" not in row:
                print_decode_row(row)
        unpatch(model)
        if graph:
            torch.cuda.empty_cache()
    print_profiles(out["rows"])
    out["separate"] = separate = guarded("separate models", separate_models, model, prompts,
                                         counts, copies, prompt_len, new_tokens)
    save(out)
    if "error" in separate:
        return out
    for row in out["rows"]:
        if "error" in row:
            continue
        n, fit = row["tenants"], separate["fit"]
        row["x_separate"] = row["tokens_per_s"] / separate["tokens_per_s"]
        row["separate_fit"] = None if fit is None else n <= fit
        print(f"  N={n:<3} {row['lever']:<14}{row['tokens_per_s']:>9.0f} tokens/s = "
              f"{row['x_separate']:.2f}× {n} separate models"
              + ("" if row["separate_fit"] is not False else
                 f" (which would not fit: {n} × {separate['model_gb']:.1f} GB)"))
    save(out)
    return out


def separate_models(model, prompts, counts, copies: int, prompt_len: int,
                    new_tokens: int) -> dict:
    """Separate fp16 models of `model`'s shape, decoded in turn at batch 1, each step one
    graph replay: as many as `copies`, the largest tenant count and the device memory allow
    (copies of `model`: the timing does not depend on the weights' values). Returns their
    tokens/s together, how many were measured and how many would fit."""
    graph = prompts.is_cuda
    per_model = model_bytes(model) + kv_bytes(model, 1, prompt_len + new_tokens)
    total = torch.cuda.get_device_properties(prompts.device).total_memory if graph else 0
    fit = int(0.95 * total // per_model) if graph else None
    k = max(1, min(max(counts), copies, fit or copies))
    models = [model] + [copy.deepcopy(model) for _ in range(k - 1)]
    decs = [Decoder(mm, prompts[:1], torch.zeros(1, dtype=torch.long), new_tokens)
            for mm in models]
    for dec in decs:
        if graph:
            dec.capture()
        dec.prefill()
    synchronize(prompts.device)
    t0 = time.perf_counter()
    for _ in range(new_tokens - 1):
        for dec in decs:
            dec.graph.replay() if graph else dec.step()
    synchronize(prompts.device)
    seconds = time.perf_counter() - t0
    out = dict(measured_models=k, fit=fit, model_gb=per_model / 1e9,
               tokens_per_s=k * (new_tokens - 1) / seconds,
               ms_per_model_step=1e3 * seconds / (k * (new_tokens - 1)))
    print(f"separate fp16 models: {k} decoded in turn at batch 1: {out['tokens_per_s']:.0f} "
          f"tokens/s ({per_model / 1e9:.1f} GB each with its KV cache"
          + (f"; {fit} fit in {total / 1e9:.0f} GB" if graph else "") + ")")
    return out


PAIR_QUESTIONS = ("What is 17 + 25?", "Reverse the order of these words: cat dog bird",
                  "Name three primary colours.", "What is the capital of France?",
                  "Write one sentence about rain.", "What is 3 + 9 + 14?",
                  "Spell the word river backwards.", "Which day comes after Tuesday?")


def pair_prompts(tok, n: int) -> tuple[list[str], str]:
    """n chat prompts and where they come from: eval.py's task problems (its held-out
    seeds) where reasoning-gym is installed, else PAIR_QUESTIONS in turn."""
    import eval as ev
    try:
        import reasoning_gym  # noqa: F401
    except ImportError:
        questions = [PAIR_QUESTIONS[i % len(PAIR_QUESTIONS)] for i in range(n)]
        source = "built-in questions"
    else:
        tasks = ev.RunConfig().tasks
        per = -(-n // len(tasks))
        questions = [e["question"] for task in tasks
                     for e in ev.make_problems(task, per, ev.TEST_SEED)[0]][:n]
        source = f"eval.py tasks {', '.join(tasks)}, held-out seeds"
    return [ev.prompt_text(tok, q) for q in questions], source


def left_pad(tok, texts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """texts -> token ids (B, T) padded on the left, and the pad count of each (B,)."""
    seqs = tok(texts, add_special_tokens=False)["input_ids"]
    T = max(map(len, seqs))
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, T - len(s):] = torch.tensor(s)
    return ids.to(device), torch.tensor([T - len(s) for s in seqs])


def agreement(got: torch.Tensor, want: torch.Tensor, eos: int | None) -> dict:
    """got, want (B, n) tokens -> the share of positions where they agree, over each row's
    positions up to want's first EOS (inclusive), and the share of rows equal throughout."""
    n = want.shape[1]
    ends = want == eos if eos is not None else torch.zeros_like(want, dtype=torch.bool)
    last = torch.where(ends.any(1), ends.int().argmax(1), n - 1)            # (B,)
    valid = torch.arange(n, device=want.device)[None] <= last[:, None]      # (B, n)
    same = got == want
    return dict(positions=int(valid.sum()), share=int((same & valid).sum()) / int(valid.sum()),
                rows_equal=float((same | ~valid).all(1).double().mean()))


def pair_rows(paths, n_prompts: int, new_tokens: int, levers, device, dtype, backend: str,
              save) -> dict:
    """A real base, its delta file and the merged checkpoint (deltacome apply's output):
    greedy tokens of the served model (base + patch_model, each serving option) against the
    merged model's on the same prompts, free-running and teacher-forced (each step fed the
    merged model's token, so that one early disagreement does not carry on), with the
    decode speed of both."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir, delta_path, merged_dir = paths
    graph = device.type == "cuda"
    tok = AutoTokenizer.from_pretrained(base_dir)
    texts, source = pair_prompts(tok, n_prompts)
    ids, pad = left_pad(tok, texts, device)
    out = dict(prompts=len(texts), source=source, prompt_len=ids.shape[1],
               new_tokens=new_tokens, rows=[])
    save(out)

    def load(path):
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    print(f"{len(texts)} prompts ({source}), {ids.shape[1]} tokens with left padding")
    print(DECODE_HEADER)
    merged = load(merged_dir)
    dec = Decoder(merged, ids, pad, new_tokens)
    row = decode_row(dec, graph, len(texts), model="pair", way="merged", lever=None)
    want = dec.tokens.clone()
    out["rows"].append(row)
    print_decode_row(row)
    del dec, merged
    served = load(base_dir)
    patch_model(served, delta_path, backend=backend)
    def measure(lever):
        dec = Decoder(served, ids, pad, new_tokens)
        row = decode_row(dec, graph, len(texts), model="pair", way="served", lever=lever)
        row["x_merged"] = row["ms_per_token"] / out["rows"][0]["ms_per_token"]
        row["free_running"] = agreement(dec.tokens, want, tok.eos_token_id)
        dec.forced.copy_(want)
        dec.force.fill_(True)
        row["teacher_forced"] = agreement(dec.run(), want, tok.eos_token_id)
        dec.force.fill_(False)
        if graph:
            row["graph_vs_eager"] = graph_vs_eager(dec)
        return row
    for lever in levers:
        serving_options(served, *LEVERS[lever])
        row = guarded(f"pair served {lever}", measure, lever)
        out["rows"].append(dict(row, model="pair", way="served", lever=lever))
        save(out)
        if "error" in row:
            continue
        print_decode_row(row)
        print(f"  greedy tokens equal to the merged model's: free-running "
              f"{row['free_running']['share']:.4f} of {row['free_running']['positions']} "
              f"positions ({row['free_running']['rows_equal']:.3f} of the sequences "
              f"throughout), teacher-forced {row['teacher_forced']['share']:.4f}")
    return out


def decode_main(args, out: dict, save, device) -> int:
    """--decode: the sections asked for, each on its own (an error is printed with its
    traceback, recorded, and the next section runs); results saved as they come."""
    import gc
    import traceback
    cuda = device.type == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    backend = "auto" if cuda else "reference"
    if not cuda:
        print("CPU: no CUDA device, so a tiny model, the reference backend and eager steps "
              "(no CUDA graphs, no profile); the block section needs CUDA")
    levers = args.levers.split(",")
    batches = [int(b) for b in args.batches.split(",")] if args.batches else DECODE_BATCHES
    counts = [int(n) for n in args.tenants.split(",")] if args.tenants else DECODE_TENANTS
    models = args.models.split(",") if args.models else None
    blocks = {k: MODELS[k] for k in (models or DECODE_BLOCKS)}
    main_model = (models or [DECODE_MODEL])[0] if cuda else "tiny (CPU)"
    m = MODELS[main_model] if cuda else DECODE_CPU
    try:
        import transformers
    except ImportError:
        print("bench.py: error: --decode needs transformers (pip install -r "
              "requirements-eval.txt)")
        return 2
    print(f"transformers {transformers.__version__}")
    res = out.setdefault("decode", {})
    res.update(transformers=transformers.__version__, prompt_len=args.prompt_len,
               new_tokens=args.new_tokens, levers=levers, seconds={}, errors={})
    cache: dict = {}
    jobs = {
        "model": lambda put: decode_model_rows(
            main_model, m, batches, levers, args.prompt_len, args.new_tokens, device, dtype,
            backend, cache, put, not args.no_profile and cuda),
        "tenants": lambda put: decode_tenant_rows(
            main_model, m, counts, levers if cuda else levers[:1], args.prompt_len,
            args.tenant_new_tokens, args.merged_copies, device, dtype, backend, cache, put,
            not args.no_profile and cuda),
        "blocks": lambda put: put(layer_rows(
            blocks, (1, 16), dtype, device,
            {s: cm for b in blocks.values() for s, cm in prototypes(b, device, cache).items()},
            levers)),
        "pair": lambda put: pair_rows(args.pair, args.pair_prompts, args.pair_new_tokens,
                                      levers, device, dtype, backend, put),
    }
    for section in args.sections.split(","):
        if section == "pair" and not args.pair:
            print("\n== decode: pair: skipped (no --pair BASE DELTA MERGED) ==")
            continue
        if section == "blocks" and not cuda:
            print("\n== decode: blocks: skipped (needs CUDA) ==")
            continue
        print(f"\n== decode: {section} ==", flush=True)
        t0 = time.perf_counter()

        def put(value, section=section):
            res[section] = value
            save()
        try:
            jobs[section](put)
        except Exception:
            traceback.print_exc()
            res["errors"][section] = traceback.format_exc()
        res["seconds"][section] = time.perf_counter() - t0
        save()
        print(f"== decode: {section}: {res['seconds'][section]:.1f} s ==", flush=True)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    failed = sorted(set(res["errors"]) | {k for k in SECTIONS if has_error(res.get(k))})
    if failed:
        print(f"decode: errors in {', '.join(failed)} (tracebacks above and in the JSON)")
    return 1 if failed else 0


def has_error(result) -> bool:
    """Whether a section's result holds a configuration that failed (guarded) or a check
    that failed (fail)."""
    if isinstance(result, dict):
        return ("error" in result or result.get("fail") is True
                or any(has_error(v) for v in result.values()))
    return isinstance(result, list) and any(has_error(v) for v in result)


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


def save_json(out: dict, path: str | None) -> None:
    """Write `out` to path (if given) through a temporary file, so a reader never sees half."""
    if path:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(out, f, indent=1)
        os.replace(tmp, path)


def check_decode_args(p: argparse.ArgumentParser, args) -> None:
    """The --decode options' values, or the parser's one-line error."""
    def names(option, text, known):
        bad = [v for v in text.split(",") if v not in known]
        if bad:
            p.error(f"{option}: unknown {bad[0]!r}; choose from {', '.join(known)}")
    if args.models:
        names("--models", args.models, MODELS)
    names("--levers", args.levers, LEVERS)
    names("--sections", args.sections, SECTIONS)
    for option in ("batches", "tenants"):
        text = getattr(args, option)
        if text and not all(v.isdigit() and int(v) > 0 for v in text.split(",")):
            p.error(f"--{option} takes positive integers separated by commas, not {text!r}")
    for option, least in (("prompt_len", 1), ("new_tokens", 2), ("tenant_new_tokens", 2),
                          ("merged_copies", 1), ("pair_prompts", 1), ("pair_new_tokens", 2)):
        if getattr(args, option) < least:
            p.error(f"--{option.replace('_', '-')} must be at least {least}")
    for path in args.pair or ():
        if not os.path.exists(path):
            p.error(f"--pair: {path} does not exist")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", help="comma-separated keys of MODELS (default: all; with "
                   f"--decode: {DECODE_MODEL} for the model and tenant sections, "
                   f"{','.join(DECODE_BLOCKS)} for the block section)")
    p.add_argument("--batches", help="comma-separated batch sizes (default: "
                   f"{','.join(map(str, BATCHES))}; with --sweep: "
                   f"{','.join(map(str, SWEEP_BATCHES))}; with --decode: "
                   f"{','.join(map(str, DECODE_BATCHES))})")
    p.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16")
    p.add_argument("--check", action="store_true",
                   help="check the tuned and the simple kernels against the reference "
                        "(awkward and real shapes, batch 1/2/7/16/64, fp16 and bf16) instead "
                        "of the timing table")
    p.add_argument("--sweep", nargs="?", const=",".join(SWEEP_SHAPES), metavar="OUTxIN,...",
                   help=f"time launch configurations at these shapes (default "
                        f"{','.join(SWEEP_SHAPES)}) and batches")
    p.add_argument("--no-layer", action="store_true", help="skip the whole-layer rows")
    p.add_argument("--tenants", metavar="N,N,...",
                   help=f"run the multi-tenant scenario instead of the table, for these tenant "
                        f"counts (e.g. {','.join(map(str, TENANTS))}), on the first of --models;"
                        f" with --decode: the tenant counts of its tenant section (default "
                        f"{','.join(map(str, DECODE_TENANTS))})")
    p.add_argument("--ceiling", action="store_true",
                   help="time a bare read-only launch at 1–32 MB instead of the table: the "
                        "streaming ceiling of one launch")
    p.add_argument("--profile", metavar="OUTxIN",
                   help="only run the kernels at this shape (first of --batches) four times, "
                        "as a workload for ncu or nsys")
    d = p.add_argument_group("end-to-end decode (--decode)")
    d.add_argument("--decode", action="store_true",
                   help="time greedy decoding of a whole model instead of the table: served "
                        "from compressed deltas vs merged vs the base alone, N tenants vs N "
                        "models, one block with each serving option, a real pair (--pair)")
    d.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"the --decode sections to run, in order (default: "
                        f"{','.join(SECTIONS)}; pair only with --pair)")
    d.add_argument("--levers", default=",".join(LEVERS),
                   help=f"serving options to measure (kernel.serving_options), of "
                        f"{','.join(LEVERS)} (default: all)")
    d.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (default 128)")
    d.add_argument("--new-tokens", type=int, default=256,
                   help="tokens generated per sequence in the model section (default 256)")
    d.add_argument("--tenant-new-tokens", type=int, default=64,
                   help="tokens generated per sequence in the tenant section (default 64)")
    d.add_argument("--merged-copies", type=int, default=4,
                   help="separate fp16 models decoded in turn against the tenants, at most as "
                        "many as fit (default 4)")
    d.add_argument("--pair", nargs=3, metavar=("BASE", "DELTA", "MERGED"),
                   help="a real base directory, its delta file and the merged directory "
                        "(deltacome apply): served vs merged greedy tokens")
    d.add_argument("--pair-prompts", type=int, default=64,
                   help="prompts decoded in one batch for --pair (default 64)")
    d.add_argument("--pair-new-tokens", type=int, default=64,
                   help="tokens generated per prompt for --pair (default 64)")
    d.add_argument("--no-profile", action="store_true",
                   help="skip the per-kernel profiles of the decode steps (model section: "
                        "the first batch; tenants section: every N)")
    p.add_argument("--json", help="also write every number to this JSON file (with --decode: "
                   "rewritten as each result comes)")
    args = p.parse_args(argv)
    check_decode_args(p, args)
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    batches = [int(b) for b in (args.batches or ",".join(
        map(str, SWEEP_BATCHES if args.sweep else BATCHES))).split(",")]
    out = {"versions": versions_line(device), "argv": sys.argv[1:]}
    print(out["versions"])
    if args.decode:
        return decode_main(args, out, lambda: save_json(out, args.json), device)
    args.models = args.models or ",".join(MODELS)
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
        save_json(out, args.json)
        print(f"wrote {args.json}")
    rows = out.get("rows", []) + out.get("tenants", {}).get("rows", []) + out.get("layer", [])
    return 1 if any(r.get("fail") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
