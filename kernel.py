"""The delta path of a compressed fine-tune, computed from the packed codes.

For one linear layer with base weight W (out × in) and a compressed delta Δ̂ = Û diag(S) V̂ᵀ
(deltacome.py's `CompressedMatrix`: bands of singular triplets, each band's Û, V̂ at one bit
width), the fine-tune's output is

    y = x Wᵀ + ((x V̂) ⊙ S) Ûᵀ      x: (batch, in), V̂: (in, r), Û: (out, r), y: (batch, out)

The delta term is two skinny matmuls, "phase V" (z = (x V̂) ⊙ S) and "phase U" (y = z Ûᵀ),
memory-bound at decode batch sizes: the floor is the packed bytes over HBM bandwidth. This
file holds, in the order to read them:

  Start here
    delta_matmul_reference  dequantize every band to the compute dtype, two torch matmuls:
                            the ground truth, readable, runs anywhere
    delta_matmul_simple     the same two matmuls as two small Triton kernels that read the
                            stored codes: one launch per band and phase, each code unpacked
                            by a shift and a mask, times its group's scale, plus its zero
  The tuned kernels (the same sums, tested against the same truth)
    prepare_delta           a one-time repack of the stored codes into the layout the tuned
                            kernels read (the file format stays as it is)
    _v_kernel, _u_kernel    each phase over all bands in one launch, codes dequantized in
                            registers, work cut into items that fill the GPU
    choose_config           the tiling of a launch pair, per shape, batch and GPU
  Wrappers
    delta_matmul            checks, picks a backend ("triton": the tuned kernels, "simple",
                            "reference"), launches
  Serving one fine-tune
    DeltaLinear             nn.Linear + compressed delta, forward = base + delta path
    patch_model             swaps a model's Linear layers for DeltaLinear from a delta file
  Multi-tenant serving (N fine-tunes of one base in one batch, a tenant index per row)
    multi_delta_matmul_reference   a loop over tenants of delta_matmul_reference
    plan_tenants            a batch's rows grouped by tenant, once per batch (host side)
    prepare_multi_delta     N deltas in one runtime layout (a single delta is N = 1)
    multi_delta_matmul      checks, plans, picks a backend, launches the same two tuned
                            kernels over a (tenant segment, work item) grid
    MultiDeltaLinear        nn.Linear + N compressed deltas, forward(x, tenant_idx)
    per-tenant tensors      a full fine-tune's other changes, each row its own tenant's:
                            MultiNorm (norm weights, biases), MultiDeltaEmbedding (E[id] +
                            Δ̂ₜ[id] rebuilt per token), Linear biases and stored rows
                            (TenantTerms); lm_head is a MultiDeltaLinear
    patch_model_tenants     loads N delta files onto one base model; `use_tenants` sets the
                            tenant of each sequence for one forward pass

  Serving options of a patched model (serving_options; patch_model fuses by default):
    prepare_fused_delta     the deltas of layers that read one input (q/k/v, gate/up) in one
                            runtime layout, their outputs side by side: one launch pair
    DeltaGroup              such layers served together (fuse)
    run_overlapped          a layer's two launches on a side stream, its base GEMM beside
                            phase V (overlap)

Usage:
    dl = DeltaLinear(base_linear, read_delta_file(path).matrices[name])
    model_names = patch_model(model, "delta.safetensors")      # serve without merging
    y = delta_matmul(x, cm, backend="simple")                  # the kernel to learn from
    patch_model_tenants(model, ["math.safetensors", "code.safetensors"])  # N fine-tunes
    with use_tenants(model, torch.tensor([0, 1, 1, 0])):     # a tenant per sequence
        logits = model(input_ids).logits                      # input_ids: (4, seq)
    serving_options(model, fuse=True, overlap=True)            # fewer, overlapped launches

What the tuned kernels do that the simple one does not (each measured in
docs/PERFORMANCE.md, which also records what was tried and dropped):

* Two instructions a code. At 1/16 of the fp16 delta most bytes are 2-bit codes, 4 a byte;
  to stream them at 3 TB/s an SM must consume ~50 codes per clock. A code masked where it
  lies in its word (one LOP3, the mask an immediate) is, read as an fp32 with a zero
  exponent, the exact denormal q·2^pos·2^-149, ready for one FFMA with the factor it
  multiplies, which carries the power of two back (_code_denormals). No shift, and no
  int-to-float conversion (16 a clock per SM).
* Affine fold. Σ_j x_j (q_j s + m) = s Σ_j x_j q_j + m Σ_j x_j per group, so a group's scale
  and zero cost nothing per code in phase V; in phase U a thread owns slots of 32 outputs
  inside one group, whose codes share one factor z·scale per (vector, slot).
* Layout. Phase V reads V̂ transposed, (positions/pw, vectors), phase U reads Û as stored,
  (vectors, outputs/pw), so both reductions stay inside a thread; the scale and zero of a
  group are one int32, so every load is 4 or 16 bytes. Phase U's main loop is pipelined
  with async copies; phase V's mostly uses plain loads, as every thread needs all of a
  step's x: the lanes of a warp convert it once between them and share it through shared
  memory. In phase U the z of a vector, which every thread needs, is a scalar load.
* Work items. Each phase is one launch over all bands, its work cut into items (tile ×
  chunk of the reduction) until the grid fills the GPU (choose_config). Phase V's items add
  their parts straight into z with fp32 atomics, into one of two z buffers, while phase U
  zeroes the other one for the next launch (_z_buffer, _z_turn); a tile of phase U with
  several items sums them in a zeroed fp32 workspace, and the last item (a counter: each
  count releases, the last acquires) writes the result. No memset, no extra launch. The
  order of the adds, and so the last bits, can vary between runs.
* Overlap. On Hopper the two launches overlap by programmatic dependent launch: the next
  kernel's programs start as this one's finish and wait only before they read what a
  kernel wrote (_wait_previous); in a grid of one round only once this one's programs are
  past their main loops, so that they spread over all SMs (KernelConfig.early_next).
* Batch. Batch 1 runs on CUDA-core FMAs (tensor cores would waste 15/16 of their rows), and
  so does batch 2 on wide outputs, the rows sharing each code's mask; batches up to 32 pad
  to 16/32 rows and use tl.dot on the exact codes: phase V in fp16 for fp16 x (codes ≤ 255
  are exact in fp16), in tf32 for bf16 x; phase U in fp16 with z·scale lifted per row by a
  power of two into fp16's range (_row_lift), or tf32.

The fp32 workspace and the counters are shared by every prepared delta on a device
(`workspace`): launches on one device must not overlap (one CUDA stream at a time; the
overlap option keeps every delta launch on one side stream, see serving_options).
"""

from __future__ import annotations

import functools
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Sequence

import torch
import triton
import triton.language as tl

from deltacome import (CompressedMatrix, DeltaComeError, DeltaFile, container_bits,
                       decompress_matrix, dequantize_vectors, place_rows, probe,
                       probes_match, read_delta_file, same_bits)

# The tuned kernels' constants (see THE TUNED KERNELS below).
FMA_ROWS = 2           # batches of up to this many rows can run on CUDA-core FMAs (see
                       # choose_config), larger ones run on tl.dot
MAX_BATCH = 32         # rows of one plan segment at most; larger batches take several (Triton
                       # 3.6 fails to compile the 64-row tl.dot path; see rows_per_launch)
LIFT_LOG2 = 64         # products of codes (as denormals) are taken 2^64 high: see _code_denormals
_LIFT = tl.constexpr(2.0**LIFT_LOG2)
_FMA_ROWS = tl.constexpr(FMA_ROWS)
_UNSCALE_EXP = tl.constexpr(127 + 149 - LIFT_LOG2)   # fp32 exponent field of 2^(149 - 64)


# ==============================================================================================
# START HERE: the reference, then the simple kernel.

# ----------------------------------------------------------------------------------------------
# Reference: dequantize, then two matmuls in the compute dtype. The ground truth.


def dequantize_bands(cm: CompressedMatrix, dtype: torch.dtype, device):
    """CompressedMatrix -> V̂ (r, in), S (r,), Û (r, out), all bands stacked, in `dtype`."""
    V = torch.cat([dequantize_vectors(b.V) for b in cm.bands]).to(device, dtype)   # (r, in)
    U = torch.cat([dequantize_vectors(b.U) for b in cm.bands]).to(device, dtype)   # (r, out)
    S = torch.cat([b.S for b in cm.bands]).to(device, dtype)                       # (r,)
    return V, S, U


def delta_matmul_reference(x: torch.Tensor, cm: CompressedMatrix) -> torch.Tensor:
    """x (..., in) -> x Δ̂ᵀ (..., out) = ((x V̂) ⊙ S) Ûᵀ, computed in x.dtype."""
    out_f, in_f = cm.shape
    if x.shape[-1] != in_f:
        raise ValueError(f"x has {x.shape[-1]} features, the delta expects in={in_f}")
    if not cm.bands:
        return x.new_zeros(*x.shape[:-1], out_f)
    V, S, U = dequantize_bands(cm, x.dtype, x.device)
    z = (x @ V.mT) * S                                                  # (..., r)
    return z @ U                                                        # (..., out)


# ----------------------------------------------------------------------------------------------
# The simple kernel: the reference's two matmuls in Triton, read straight from the stored
# codes (no repack). Read it before the tuned kernels: they compute the same sums.
#
# Per band of rank r at c-bit containers (pw = 32/c codes a word), as deltacome.py stores it:
# codes (r, ⌈n/pw⌉) int32, element k of vector j = code k % pw of word k // pw, least
# significant first; scale, zero (r, ⌈n/g⌉) fp16, element k in group k // g; S (r,) fp32.
# One launch per band and phase; each element is unpacked where it is used and every sum is
# taken in fp32, so the result is rounded once, to x.dtype, at the end.

SIMPLE_ROWS = 4            # batch rows a program takes; more rows run in more programs
SIMPLE_BLOCK_R = 16        # vectors a program takes (phase V) or sums over per step (phase U)
SIMPLE_TILE = 8192         # rows × vectors × positions (or outputs) a program multiplies per
SIMPLE_WARPS = 8           # step: its fp32 sums and codes fit the registers of 8 warps


@triton.jit
def _simple_unpack(codes_ptr, scale_ptr, zero_ptr, j, k, mask, n_words, n_groups,
                   C: tl.constexpr, GROUP: tl.constexpr):
    """Elements k of vectors j of one band's Û or V̂ (broadcastable int32 tensors, `mask`
    where they exist) -> code · scale + zero in fp32 (0 off the mask)."""
    PW: tl.constexpr = 32 // C                                   # codes a word
    word = tl.load(codes_ptr + j * n_words + k // PW, mask=mask, other=0)
    code = (word >> (C * (k % PW))) & ((1 << C) - 1)             # shift it down, mask it off
    group = j * n_groups + k // GROUP
    scale = tl.load(scale_ptr + group, mask=mask, other=0.0).to(tl.float32)
    zero = tl.load(zero_ptr + group, mask=mask, other=0.0).to(tl.float32)
    return code.to(tl.float32) * scale + zero


@triton.jit
def _simple_v_kernel(x_ptr, n_rows, n_in, codes_ptr, scale_ptr, zero_ptr, S_ptr, rank,
                     z_ptr, C: tl.constexpr, GROUP: tl.constexpr, BLOCK_B: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """Phase V of one band: z[b, j] = S[j] · Σ_k x[b, k] V̂[j, k]. x (n_rows, n_in), z
    (n_rows, rank) fp32. Program (i, t) takes rows i·BLOCK_B.. and vectors t·BLOCK_R.., and
    walks all n_in positions, BLOCK_K at a time: one FMA per product into a sum of its own,
    reduced over the positions once at the end."""
    b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)                  # (BLOCK_B,) rows
    j = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)                  # (BLOCK_R,) vectors
    n_words, n_groups = tl.cdiv(n_in, 32 // C), tl.cdiv(n_in, GROUP)       # of a stored row
    acc = tl.zeros((BLOCK_B, BLOCK_R, BLOCK_K), tl.float32)
    for k0 in range(0, n_in, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)                                      # (BLOCK_K,)
        v = _simple_unpack(codes_ptr, scale_ptr, zero_ptr, j[:, None], k[None, :],
                           (j[:, None] < rank) & (k[None, :] < n_in), n_words, n_groups, C,
                           GROUP)                                           # (BLOCK_R, BLOCK_K)
        xk = tl.load(x_ptr + b[:, None] * n_in + k[None, :],
                     mask=(b[:, None] < n_rows) & (k[None, :] < n_in), other=0.0)
        xk = xk.to(tl.float32)                                              # (BLOCK_B, BLOCK_K)
        acc += xk[:, None, :] * v[None, :, :]                                # FMA
    S = tl.load(S_ptr + j, mask=j < rank, other=0.0)
    tl.store(z_ptr + b[:, None] * rank + j[None, :], tl.sum(acc, 2) * S[None, :],
             mask=(b[:, None] < n_rows) & (j[None, :] < rank))


@triton.jit
def _simple_u_kernel(z_ptr, n_rows, rank, codes_ptr, scale_ptr, zero_ptr, y_ptr, n_out,
                     C: tl.constexpr, GROUP: tl.constexpr, BLOCK_B: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr):
    """Phase U of one band: y[b, o] += Σ_j z[b, j] Û[j, o]. z (n_rows, rank) and y (n_rows,
    n_out) fp32. Program (i, t) takes rows i·BLOCK_B.. and outputs t·BLOCK_O.., and walks the
    band's vectors, BLOCK_R at a time, summing as phase V does. It alone writes its outputs
    (the bands' launches run one after another), so a plain load and store adds into y."""
    b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)                  # (BLOCK_B,) rows
    o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)                  # (BLOCK_O,) outputs
    n_words, n_groups = tl.cdiv(n_out, 32 // C), tl.cdiv(n_out, GROUP)     # of a stored row
    acc = tl.zeros((BLOCK_B, BLOCK_R, BLOCK_O), tl.float32)
    for j0 in range(0, rank, BLOCK_R):
        j = j0 + tl.arange(0, BLOCK_R)                                      # (BLOCK_R,)
        u = _simple_unpack(codes_ptr, scale_ptr, zero_ptr, j[:, None], o[None, :],
                           (j[:, None] < rank) & (o[None, :] < n_out), n_words, n_groups, C,
                           GROUP)                                           # (BLOCK_R, BLOCK_O)
        zj = tl.load(z_ptr + b[:, None] * rank + j[None, :],
                     mask=(b[:, None] < n_rows) & (j[None, :] < rank), other=0.0)
        acc += zj[:, :, None] * u[None, :, :]                                # FMA
    mask = (b[:, None] < n_rows) & (o[None, :] < n_out)
    offs = b[:, None] * n_out + o[None, :]
    y = tl.load(y_ptr + offs, mask=mask, other=0.0) + tl.sum(acc, 1)       # (BLOCK_B, BLOCK_O)
    tl.store(y_ptr + offs, y, mask=mask)


def delta_matmul_simple(x: torch.Tensor, cm: CompressedMatrix,
                        base: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., in) -> x Δ̂ᵀ (..., out), plus `base` (..., out) if given, in x.dtype, by the
    simple kernels on x's device (CUDA, or CPU under TRITON_INTERPRET=1); the bands' tensors
    must be there too. Per band: phase V into z (B, r) fp32, then phase U adds z Ûᵀ into the
    fp32 output, which starts as the base output (or zero)."""
    out_f, in_f = cm.shape
    x2 = x.reshape(-1, in_f).contiguous()                                   # (B, in)
    B = x2.shape[0]
    y = torch.zeros(B, out_f, dtype=torch.float32, device=x.device)        # (B, out)
    if base is not None:
        y += base.reshape(B, out_f)
    if B == 0:
        return y.to(x.dtype).reshape(*x.shape[:-1], out_f)
    block_b = min(triton.next_power_of_2(B), SIMPLE_ROWS)
    block = max(16, SIMPLE_TILE // (block_b * SIMPLE_BLOCK_R))             # positions, outputs
    for band in cm.bands:
        if band.S.device != x.device:
            raise ValueError(f"the delta is on {band.S.device}, x on {x.device}")
        c, r = container_bits(band.bits), band.rank
        z = torch.empty(B, r, dtype=torch.float32, device=x.device)         # (B, r)
        _simple_v_kernel[(triton.cdiv(B, block_b), triton.cdiv(r, SIMPLE_BLOCK_R))](
            x2, B, in_f, band.V.codes, band.V.scale, band.V.zero, band.S, r, z,
            C=c, GROUP=band.V.group_size, BLOCK_B=block_b, BLOCK_R=SIMPLE_BLOCK_R,
            BLOCK_K=block, num_warps=SIMPLE_WARPS)
        _simple_u_kernel[(triton.cdiv(B, block_b), triton.cdiv(out_f, block))](
            z, B, r, band.U.codes, band.U.scale, band.U.zero, y, out_f,
            C=c, GROUP=band.U.group_size, BLOCK_B=block_b, BLOCK_R=SIMPLE_BLOCK_R,
            BLOCK_O=block, num_warps=SIMPLE_WARPS)
    return y.to(x.dtype).reshape(*x.shape[:-1], out_f)


# ==============================================================================================
# THE TUNED KERNELS: the simple kernel's sums, each phase in one launch over all bands,
# codes dequantized in registers, the work cut into items that fill the GPU. The runtime
# layout, the kernels, their tiling (choose_config) and the launcher, in that order.

# ----------------------------------------------------------------------------------------------
# Runtime layout: the stored codes, transposed where phase V needs it, with work tables.
#
# N ≥ 1 deltas of one matrix shape ("tenants"; a single fine-tune is N = 1) are concatenated
# into one buffer per kind. Per band of rank r at c-bit containers (pw = 32/c codes a word):
#
#   phase V: words (⌈in/g⌉·g/pw, ldv) int32: word (t, j) holds the codes of vector j at input
#            positions t·pw .. t·pw+pw-1 (the stored row of vector j, transposed, so a row of
#            words is one position range for all vectors); ldv = r rounded up to 16;
#            scale | zero << 16 (⌈in/g⌉, r) int32 (each fp16).
#   phase U: words (r, ldu) int32: the stored rows as they are, word w of vector j holding its
#            codes at outputs w·pw .. w·pw+pw-1; ldu = ⌈out/pw⌉ rounded up to 16;
#            scale | zero << 16 (r, ⌈out/g⌉) int32 (each fp16); r padded to a multiple of 16.
#   S (r,) fp32.
#   z: a row per batch row, each band's columns from its z column on, r of them padded to a
#            multiple of 16 that stay zero (KernelDelta.z_width), so phase U reads z unmasked.
#
# Padding codes are 0 and padding scales 0. Every band starts 16-word aligned, so a thread's
# 4 consecutive words are one 16-byte load.
#
# Work tables. A program of phase V reduces one column tile of one band (BLOCK_J vectors)
# over a chunk of its quantization groups; a program of phase U reduces one output tile
# (BLOCK_O outputs) over a chunk of one band's vectors. A tile with several such programs
# ("items") sums them in a shared fp32 workspace (see _reduce). An item is a WorkItem, stored
# as a row of ITEM_COLS int32 (its fields in order, then zeros). Tables are per tenant,
# padded to the largest tenant's item count with empty rows (0 items: the program returns),
# built once per tiling and cached.
#
# Fused deltas. Matrices that read the same input (a block's q/k/v, or gate/up: "members")
# can share one layout: phase V treats all their bands as one delta's (one z row), and phase
# U tiles each member's outputs on its own, writing member m to columns outputs[m] of one
# output row. A phase-U item's output tile is then its tile within its member (for the words
# and scales it reads) and `tile` numbers the tiles of all members (its counter). Phase-U
# scale rows are as long as the widest member's (KernelDelta.u_groups), so that their
# length stays one kernel argument. A single matrix is one member at column 0.


class BandLayout(NamedTuple):
    """Where one band of one tenant lies in a KernelDelta's buffers (element offsets)."""
    c: int                  # container width in bits (1, 2, 4 or 8)
    rank: int
    v_words: int            # phase V: first word of its (positions/pw, ldv) block
    ldv: int                #   words a row: rank rounded up to 16
    v_sz: int               #   first scale|zero of its (⌈in/g⌉, rank) block
    u_words: int            # phase U: first word of its (rank padded to 16, ldu) block
    ldu: int                #   words a row: ⌈out/pw⌉ rounded up to 16
    u_sz: int               #   first scale|zero of its (rank padded to 16, u_groups) block
    S: int                  # first singular value
    z_col: int              # first column of z


class WorkItem(NamedTuple):
    """What one program of a launch computes: one row of a work table."""
    c: int                  # container width of the band
    words: int              # first word of the band in this phase's layout
    ld: int                 # words a row of that layout
    rank: int               # the band's rank
    first: int              # phase V: first vector of the tile; phase U: the output tile
                            #   within its member
    lo: int                 # the reduction's range lo..hi: groups (phase V) or band-local
    hi: int                 #   vectors (phase U)
    sz: int                 # first scale|zero of the band in this phase's layout
    S: int                  # first singular value of the band
    z_col: int              # first column of the band in z
    tile: int               # the tile's index among this tenant's tiles
    tile_items: int         # items of the tile (0: an empty padding item)
    out0: int = 0           # phase U: the member's first output column (fused deltas)
    n_out: int = 0          # phase U: the member's outputs


ITEM_COLS = 16                         # int32s a work-table row (WorkItem, then zeros)
_ITEM_COLS = tl.constexpr(ITEM_COLS)   # kernels may only read constexpr globals
# The column of each WorkItem field, for the kernels.
_C, _WORDS, _LD, _RANK, _FIRST, _LO, _HI, _SZ, _S, _Z_COL, _TILE, _TILE_ITEMS, _OUT0, _N_OUT = (
    tl.constexpr(WorkItem._fields.index(name)) for name in (
        "c", "words", "ld", "rank", "first", "lo", "hi", "sz", "S", "z_col", "tile",
        "tile_items", "out0", "n_out"))


class Segment(NamedTuple):
    """Rows of one tenant in a batch sorted by tenant (a row of a TenantPlan's segments)."""
    tenant: int
    row0: int               # first sorted row
    rows: int               # at most MAX_BATCH


SEG_COLS = len(Segment._fields)
_SEG_COLS = tl.constexpr(SEG_COLS)
_SEG_TENANT, _SEG_ROW0, _SEG_ROWS = (
    tl.constexpr(Segment._fields.index(name)) for name in ("tenant", "row0", "rows"))
Z_STATE = 4                            # int32s before the tile counters: see _z_buffer
_Z_STATE = tl.constexpr(Z_STATE)
_TURN, _TURN_READ, _DIRTY = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)   # Z_STATE's


@dataclass
class KernelDelta:
    """N ≥ 1 tenants' deltas in the runtime layout above, on one device; each tenant holds
    one matrix's delta, or the deltas of matrices that read one input side by side
    (members, prepare_fused_delta)."""
    shape: tuple[int, int]          # (Σ members' out, in)
    group_size: int
    containers: tuple[int, ...]     # container widths present in any tenant
    ranks: tuple[int, ...]          # Σ band ranks, per tenant
    nbytes: tuple[int, ...]         # stored bytes of each tenant's CompressedMatrices
    device_bytes: tuple[int, ...]   # bytes of each tenant's share of the buffers below
    bands: list                     # per tenant, its bands' BandLayout
    S: torch.Tensor                 # fp32, flat
    v_words: torch.Tensor           # int32, flat
    v_sz: torch.Tensor              # int32, flat: fp16 scale | fp16 zero << 16
    u_words: torch.Tensor
    u_sz: torch.Tensor              # int32, flat: fp16 scale | fp16 zero << 16
    outputs: tuple[tuple[int, int], ...]   # per member: (first output column, outputs)
    band_members: list              # per tenant, per band: the member it belongs to
    _tables: dict = field(default_factory=dict)

    @property
    def n_tenants(self) -> int:
        return len(self.ranks)

    @property
    def max_rank(self) -> int:
        return max(1, max(self.ranks))

    @functools.cached_property
    def aligned_outputs(self) -> bool:
        """Whether every member's columns start and end at multiples of 16 (all LLM shapes):
        then phase U's stores and their masks take 16-byte vectors (_item_columns)."""
        return all(out0 % 16 == 0 and n % 16 == 0 for out0, n in self.outputs)

    @functools.cached_property
    def u_groups(self) -> int:
        """Length of a phase-U scale row: the quantization groups of the widest member."""
        return max(-(-n // self.group_size) for _, n in self.outputs)

    @property
    def z_width(self) -> int:
        """Columns of a row of z: each band's rank padded to 16 (the padding columns stay
        zero), for the tenant with the most."""
        return max(1, max((b.z_col + _pad16(b.rank) for bands in self.bands
                           for b in bands[-1:]), default=1))

    def v_items(self, block_j: int, split: int) -> tuple[torch.Tensor, int, int]:
        """Phase-V items for tiles of block_j vectors, each tile's groups cut into `split`
        chunks, 8-bit bands' into about twice as many: their loop costs more per code, and
        in a grid of one round the slowest program sets the time (docs/PERFORMANCE.md).
        Returns (table (N·n, ITEM_COLS) of WorkItem rows, n items per tenant, most tiles of
        a tenant)."""
        key = ("v", block_j, split)
        if key not in self._tables:
            n_groups = -(-self.shape[1] // self.group_size)
            per = -(-n_groups // split)
            tables = []
            for bands in self.bands:
                rows, tile = [], 0
                for b in bands:
                    n = per if b.c < 8 else -(-per // 2)
                    for col0 in range(0, b.rank, block_j):
                        chunks = range(0, n_groups, n)
                        rows += [WorkItem(b.c, b.v_words, b.ldv, b.rank, col0, lo,
                                          min(lo + n, n_groups), b.v_sz, b.S, b.z_col, tile,
                                          len(chunks)) for lo in chunks]
                        tile += 1
                tables.append((rows, tile))
            self._tables[key] = self._pad(tables)
        return self._tables[key]

    def u_items(self, block_o: int, rows: int) -> tuple[torch.Tensor, int, int]:
        """Phase-U items for tiles of block_o outputs of each member, each band cut into
        chunks of `rows` vectors, 8-bit bands into chunks of about half as many (a multiple of
        16), for the reason v_items gives. Returns (table of WorkItem rows, n items per
        tenant, most tiles). A member without bands gets one empty item per tile, so its
        rows still get the base output."""
        key = ("u", block_o, rows)
        if key not in self._tables:
            tables = []
            for bands, members in zip(self.bands, self.band_members):
                items, tile0 = [], 0
                for member, (out0, n_out) in enumerate(self.outputs):
                    chunks = [(b, lo, n) for b, m in zip(bands, members) if m == member
                              for n in [rows if b.c < 8 else max(16, rows // 32 * 16)]
                              for lo in range(0, b.rank, n)]
                    n_tiles = -(-n_out // block_o)
                    items += [WorkItem(b.c, b.u_words, b.ldu, b.rank, tile, lo,
                                       min(lo + n, b.rank), b.u_sz, b.S, b.z_col, tile0 + tile,
                                       len(chunks), out0, n_out)
                              for tile in range(n_tiles) for b, lo, n in chunks]
                    if not chunks:      # rank 0: an empty item per tile writes the base
                        items += [WorkItem(self.containers[0], 0, 16, 0, tile, 0, 0, 0, 0, 0,
                                           tile0 + tile, 1, out0, n_out)
                                  for tile in range(n_tiles)]
                    tile0 += n_tiles
                tables.append((items, tile0))
            self._tables[key] = self._pad(tables)
        return self._tables[key]

    def _pad(self, tables):
        n = max(1, max(len(rows) for rows, _ in tables))
        flat = [list(row) + [0] * (ITEM_COLS - len(row)) for rows, _ in tables
                for row in rows + [[0] * ITEM_COLS] * (n - len(rows))]
        return (torch.tensor(flat, dtype=torch.int32, device=self.S.device), n,
                max(1, max(tiles for _, tiles in tables)))


def _pad16(n: int) -> int:
    return -(-n // 16) * 16


def _bits16(t: torch.Tensor) -> torch.Tensor:
    """fp16 tensor -> its bit patterns in the low 16 bits of int32."""
    return t.to(torch.float16).view(torch.int16).to(torch.int32) & 0xFFFF


def prepare_multi_delta(deltas: Sequence[CompressedMatrix], device) -> KernelDelta:
    """N CompressedMatrix of one shape and group size -> KernelDelta on `device` (a one-time
    repack, see above). Tenant t is deltas[t]."""
    if not deltas:
        raise ValueError("prepare_multi_delta needs at least one delta")
    return prepare_fused_delta([[cm] for cm in deltas], device)


def prepare_fused_delta(deltas: Sequence[Sequence[CompressedMatrix]], device) -> KernelDelta:
    """deltas[t][m]: member m of tenant t, members of one input size (matrices that read the
    same input) and one group size -> KernelDelta on `device` whose outputs are the members'
    side by side (KernelDelta.outputs), for one launch pair over all of them. Member m has
    the same shape in every tenant. prepare_multi_delta is the one-member case."""
    if not deltas or not deltas[0]:
        raise ValueError("prepare_fused_delta needs at least one tenant and one member")
    shapes = [tuple(cm.shape) for cm in deltas[0]]
    for t, members in enumerate(deltas):
        if [tuple(cm.shape) for cm in members] != shapes:
            raise ValueError(f"delta {t} has shape(s) {[tuple(cm.shape) for cm in members]}, "
                             f"delta 0 has {shapes}")
    if len({n for _, n in shapes}) > 1:
        raise ValueError(f"fused deltas must read one input size, got shapes {shapes}")
    groups = {b.V.group_size for members in deltas for cm in members for b in cm.bands}
    if len(groups) > 1:
        raise ValueError(f"the deltas use different group sizes {sorted(groups)}; the kernels "
                         f"take one")
    g = groups.pop() if groups else 128
    if g % 32:
        raise ValueError(f"group size {g} is not a multiple of 32")
    in_f = shapes[0][1]
    outputs = tuple((sum(o for o, _ in shapes[:m]), o) for m, (o, _) in enumerate(shapes))
    device = torch.device(device)
    n_gin, n_gout = -(-in_f // g), max(-(-o // g) for o, _ in shapes)
    parts = {k: [] for k in ("S", "vw", "vsz", "uw", "usz")}
    size = dict.fromkeys(parts, 0)
    all_bands, all_members, dev_bytes = [], [], []

    def add(kind, t):
        parts[kind].append(t.reshape(-1))
        size[kind] += t.numel()

    for members in deltas:
        bands, band_members, zc, start = [], [], 0, dict(size)
        for member, cm in enumerate(members):
            out_f = cm.shape[0]
            for band in cm.bands:
                r, c = band.rank, container_bits(band.bits)
                pw = 32 // c
                layout = BandLayout(c, r, size["vw"], _pad16(r), size["vsz"], size["uw"],
                                    _pad16(-(-out_f // pw)), size["usz"], size["S"], zc)
                # Phase V: the stored words (r, ⌈in/pw⌉) transposed to (positions/pw, ldv).
                vw = torch.zeros(n_gin * g // pw, layout.ldv, dtype=torch.int32, device=device)
                vw[: band.V.codes.shape[1], :r] = band.V.codes.to(device).mT
                add("vw", vw)
                sz = torch.zeros(n_gin, r, dtype=torch.int32, device=device)
                sz[: band.V.scale.shape[1]] = (_bits16(band.V.scale.to(device))
                                               | _bits16(band.V.zero.to(device)) << 16).mT
                add("vsz", sz)
                # Phase U: the stored words (r, ⌈out/pw⌉) in rows of ldu, r padded to 16 rows.
                uw = torch.zeros(_pad16(r), layout.ldu, dtype=torch.int32, device=device)
                uw[:r, : band.U.codes.shape[1]] = band.U.codes.to(device)
                add("uw", uw)
                sz = torch.zeros(_pad16(r), n_gout, dtype=torch.int32, device=device)
                sz[:r, : band.U.scale.shape[1]] = (_bits16(band.U.scale.to(device))
                                                   | _bits16(band.U.zero.to(device)) << 16)
                add("usz", sz)
                add("S", band.S.to(device, torch.float32))
                bands.append(layout)
                band_members.append(member)
                zc += _pad16(r)
        all_bands.append(bands)
        all_members.append(band_members)
        dev_bytes.append(4 * sum(size[k] - start[k] for k in size))
    for name, kind in (("phase-V words", "vw"), ("phase-U words", "uw")):
        if size[kind] >= 2**31:
            raise ValueError(f"{name} of {len(deltas)} deltas: {size[kind]} words do not fit "
                             f"int32 offsets; use fewer tenants per KernelDelta")

    # Slack: the kernels read whole tiles unmasked past a band's last column (see _v_fma,
    # _u_fma); those lanes are never stored.
    add("vw", torch.zeros(1024, dtype=torch.int32, device=device))
    add("uw", torch.zeros(1024, dtype=torch.int32, device=device))
    add("usz", torch.zeros(64, dtype=torch.int32, device=device))

    def cat(kind, dtype):
        return torch.cat(parts[kind]) if parts[kind] else torch.zeros(0, dtype=dtype,
                                                                      device=device)
    return KernelDelta(
        (sum(o for o, _ in shapes), in_f), g,
        tuple(sorted({b.c for bands in all_bands for b in bands})),
        tuple(sum(b.rank for b in bands) for bands in all_bands),
        tuple(sum(cm.nbytes() for cm in members) for members in deltas), tuple(dev_bytes),
        all_bands, cat("S", torch.float32), cat("vw", torch.int32), cat("vsz", torch.int32),
        cat("uw", torch.int32), cat("usz", torch.int32), outputs, all_members)


def prepare_delta(cm: CompressedMatrix, device) -> KernelDelta:
    """One CompressedMatrix -> KernelDelta on `device` (one tenant)."""
    return prepare_multi_delta([cm], device)


# ----------------------------------------------------------------------------------------------
# Triton kernels. Grid (segment, item): a segment is the rows of one tenant in the batch (one
# segment of all rows for a single delta), an item one row of that tenant's work table.
# 1–2 rows (BLOCK_B ≤ FMA_ROWS) run on CUDA-core FMAs with the codes as denormals; 16–32
# rows use tl.dot on the exact codes (fp16 or tf32, see _v_dot and _u_dot).


@triton.jit
def _code_pos(k, C: tl.constexpr):
    """The bit where code k of a word starts once it is a denormal (_code_denormals): where
    it lies, for codes that end below bit 23 (the fp32 mantissa), else 12 bits lower."""
    return tl.where(k < 23 // C, C * k, C * k - 12)


@triton.jit
def _code_denormals(w, k, C: tl.constexpr):
    """Words w and code indices k (broadcastable int32 tensors) -> q·2^(pos - 149) as fp32,
    exactly, for code q = code k of each word and pos = _code_pos(k). Codes that end below
    bit 23 are masked where they lie, the others in w >> 12 (one shift a word); a masked
    code below bit 23 with a zero exponent is the fp32 denormal q·2^pos·2^-149, so one
    logic op (the mask an immediate) makes it a float, and one FFMA multiplies and adds it.
    k is held per thread, so the select and the masks are compile-time constants. The
    power of two is undone once per row or output by `_unscale` (2^(85 - pos)) and _LIFT
    (2^64), which lifts the other factor. Products stay normal floats, and so exact as
    before rounding, for 2^-62 ≤ |x| < 2^43 (phase V) and 2^-41 ≤ |z·scale| < 2^64 (phase
    U): every fp16 value, and bf16 far past real activations; outside it they lose bits or
    overflow."""
    src = tl.where(k < 23 // C, w, w >> 12)
    return (src & (((1 << C) - 1) << _code_pos(k, C))).to(tl.float32, bitcast=True)


@triton.jit
def _unscale(k, C: tl.constexpr):
    """Code indices k (an int32 tensor) -> 2^(85 - pos) as fp32, so that _unscale · _LIFT ·
    _code_denormals = q (exact)."""
    exponent = -_code_pos(k, C) + _UNSCALE_EXP     # tensor first: the interpreter needs it
    return (exponent << 23).to(tl.float32, bitcast=True)


@triton.jit
def _scale_zero(sz):
    """A packed int32 (fp16 scale | fp16 zero << 16) -> (scale, zero) fp32. One 4-byte
    load instead of two 2-byte ones, so it can be an async copy."""
    s = (sz & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
    m = (sz >> 16).to(tl.int16).to(tl.float16, bitcast=True)
    return s.to(tl.float32), m.to(tl.float32)


@triton.jit
def _int_codes(words, C: tl.constexpr, DT: tl.constexpr = tl.float32):
    """(R, N) int32 words -> (R, N, 32/C) codes of type DT, code k of word w at [., w, k]."""
    k = tl.arange(0, 32 // C)[None, None, :]
    return ((words[:, :, None] >> (C * k)) & ((1 << C) - 1)).to(DT)


@triton.jit
def _v_fma(x_ptr, stride_x, n_in, words_ptr, sz_ptr, w_base, ld, r, col0, lo, hi,
           s_base, C: tl.constexpr, GROUP: tl.constexpr, STEP: tl.constexpr,
           BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr, STAGES: tl.constexpr):
    """Batch 1–2: (BLOCK_B, BLOCK_J) = Σ over groups lo..hi of x · V̂ᵀ for vectors col0.. of
    one band. Per group, part = Σ x·q and acc += scale·part + zero·Σx (the affine fold). A
    group is read in steps of STEP input positions (64, or 32 where that does not divide
    it); each code is one LOP3, then one FFMA a row of x·2^(85-pos) with its denormal, so
    part is Σ x·q·2^-64.

    Every thread needs all of a step's x, lifted by its code's power of two. The lanes
    load, convert and lift it once between them (two values each) and sum it for Σx; the
    reduce below is there only to keep Triton from recomputing that chain in every thread:
    without it, Triton moved the layout conversion up to the fp16 load, and each thread
    converted, lifted and added all of a step's x itself (docs/PERFORMANCE.md). The lifted
    x then reaches every thread through shared memory, four floats a load, and each
    vector's products are summed in one FFMA chain."""
    PW: tl.constexpr = 32 // C
    RI: tl.constexpr = STEP // PW                # word rows per step
    t = tl.arange(0, RI)
    k = tl.arange(0, PW)
    p = tl.arange(0, STEP)
    b = tl.arange(0, BLOCK_B)[:, None]
    lift = _unscale(p % PW, C)                   # of each position's code in its word
    cols = col0 + tl.arange(0, BLOCK_J)
    cmask = cols < r
    acc = tl.zeros((BLOCK_B, BLOCK_J), tl.float32)
    for g in tl.range(lo, hi, num_stages=STAGES):
        part = tl.zeros((BLOCK_B, BLOCK_J), tl.float32)
        xs = tl.zeros((BLOCK_B, 1), tl.float32)
        for h in tl.static_range(GROUP // STEP):
            rows = (g * GROUP + h * STEP) // PW + t
            # Unmasked (masks stop 16-byte loads): columns past the rank read padding or the
            # buffer's slack, and are never stored.
            words = tl.load(words_ptr + w_base + rows[:, None] * ld + cols[None, :])
            pos = g * GROUP + h * STEP + p
            for i in tl.static_range(BLOCK_B):       # the rows share each code's LOP3
                xv = tl.load(x_ptr + i * stride_x + pos, mask=pos < n_in,
                             other=0.0).to(tl.float32)                       # (STEP,)
                x_sum = tl.sum(xv, 0)
                xu = tl.sum(tl.join(xv * lift, tl.zeros_like(xv)), 1)  # = xv·lift, see above
                xu = tl.reshape(xu, (RI, PW))[:, :, None]                    # (RI, PW, 1)
                prod = xu * _code_denormals(words[:, None, :], k[None, :, None], C)
                row = tl.sum(tl.reshape(prod, (STEP, BLOCK_J)), 0)[None, :]
                part += tl.where(b == i, row, 0.0)   # row i of part (folds at 1 row)
                xs += tl.where(b == i, x_sum, 0.0)
        sz = tl.load(sz_ptr + s_base + g * r + cols[None, :], mask=cmask[None, :], other=0)
        s, m = _scale_zero(sz)                   # (1, BLOCK_J): a layout like part's
        acc += part * (s * _LIFT) + xs * m
    return acc


@triton.jit
def _v_dot(x_ptr, stride_x, n_rows, n_in, words_ptr, sz_ptr, w_base, ld, r, col0,
           lo, hi, s_base, C: tl.constexpr, GROUP: tl.constexpr, STEP: tl.constexpr,
           BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr, STAGES: tl.constexpr):
    """Batch 2–32, padded to 16/32 rows: (BLOCK_B, BLOCK_J) = x · V̂ᵀ over groups lo..hi: per
    group a dot of x with the exact codes, then the affine fold as in _v_fma. fp16 x: an
    fp16 dot (codes ≤ 255 are exact in fp16, and take half the bytes of tf32 through shared
    memory). bf16 x: a tf32 dot (exact too), because Triton's CPU interpreter, which the
    tests run, gets int -> bf16 conversions and bf16 dots wrong."""
    PW: tl.constexpr = 32 // C
    t = tl.arange(0, STEP // PW)
    b = tl.arange(0, BLOCK_B)
    p = tl.arange(0, STEP)
    cols = col0 + tl.arange(0, BLOCK_J)
    cmask = cols < r
    acc = tl.zeros((BLOCK_B, BLOCK_J), tl.float32)
    for g in tl.range(lo, hi, num_stages=STAGES):
        part = tl.zeros((BLOCK_B, BLOCK_J), tl.float32)
        xsum = tl.zeros((BLOCK_B,), tl.float32)
        for h in tl.static_range(GROUP // STEP):
            rows = (g * GROUP + h * STEP) // PW + t
            words = tl.load(words_ptr + w_base + rows[:, None] * ld + cols[None, :])
            pos = g * GROUP + h * STEP + p
            xt = tl.load(x_ptr + b[:, None] * stride_x + pos[None, :],
                         mask=(b[:, None] < n_rows) & (pos[None, :] < n_in),
                         other=0.0)                                          # (BLOCK_B, STEP)
            if xt.dtype == tl.float16:
                q = tl.reshape(tl.permute(_int_codes(words, C, tl.float16), (0, 2, 1)),
                               (STEP, BLOCK_J))
                part = tl.dot(xt, q, part)
            else:
                q = tl.reshape(tl.permute(_int_codes(words, C), (0, 2, 1)), (STEP, BLOCK_J))
                part = tl.dot(xt.to(tl.float32), q, part, input_precision="tf32")
            xsum += tl.sum(xt.to(tl.float32), 1)
        s, m = _scale_zero(tl.load(sz_ptr + s_base + g * r + cols, mask=cmask, other=0))
        acc += part * s[None, :] + xsum[:, None] * m[None, :]
    return acc


@triton.jit
def _u_fma(z_ptr, stride_z, words_ptr, sz_ptr, w_base, ld, lo, hi, s_base, n_gout,
           tile, C: tl.constexpr, GROUP: tl.constexpr, BLOCK_B: tl.constexpr,
           BLOCK_O: tl.constexpr, STAGES: tl.constexpr):
    """Batch 1–2: (BLOCK_B, 32/C, words a slot, slots) = Σ over vectors lo..hi of z · Û for
    one output tile, and the output index of each entry ((1, ...) of the same shape). A
    thread owns slots of 32 consecutive outputs (16 at 8 bits), at most 4 words, one 16-byte
    load: they lie in one quantization group, so one factor z·scale per (row, vector, slot)
    serves all their codes, each one LOP3, then one FFMA a row (_code_denormals). The slots
    are the last axis, so that Triton's layouts put them across the threads and a slot's
    words in one thread. Vectors are taken 16/C at a time, unrolled, so their loads are in
    flight together."""
    PW: tl.constexpr = 32 // C
    SLOT: tl.constexpr = max(PW, min(32 if C <= 4 else 16, BLOCK_O // 32))   # outputs a slot
    WS: tl.constexpr = SLOT // PW                # words a slot
    NS: tl.constexpr = BLOCK_O // SLOT           # slots in the tile
    slot = tile * NS + tl.arange(0, NS)
    w = slot[None, :] * WS + tl.arange(0, WS)[:, None]                       # (WS, NS)
    grp = slot * SLOT // GROUP
    k = tl.arange(0, PW)[:, None, None]
    b = tl.arange(0, BLOCK_B)[:, None, None, None]
    acc = tl.zeros((BLOCK_B, PW, WS, NS), tl.float32)
    zero_sum = tl.zeros((BLOCK_B, 1, 1, NS), tl.float32)
    for j0 in tl.range(lo, hi, 16 // C, num_stages=STAGES):
        for u in tl.static_range(16 // C):
            # No masks. Chunks end at a multiple of 16 vectors but at a band's end, where
            # the rows up to the next multiple of 16 are padding: zero codes and scales, and
            # z columns that stay zero (KernelDelta.z_width), so they add exact zeros.
            # Columns past the tile's last word are padding or slack (never stored). So the
            # loads stay 16-byte vectors and the unrolled loop carries no mask.
            words = tl.load(words_ptr + w_base + (j0 + u) * ld + w)
            # z of each row: scalars (as a tensor, every thread's copy of it went through
            # shared memory, with bank conflicts)
            z = tl.load(z_ptr + j0 + u)
            for i in tl.static_range(1, BLOCK_B):
                z = tl.where(b == i, tl.load(z_ptr + i * stride_z + j0 + u), z)
            s, m = _scale_zero(tl.load(sz_ptr + s_base + (j0 + u) * n_gout + grp))
            zero_sum += z * m
            acc += (z * _LIFT * s) * _code_denormals(words[None, :, :], k, C)[None]
    o = w[None, :, :] * PW + k
    return acc * _unscale(k, C)[None] + zero_sum, o[None]


@triton.jit
def _row_lift(zs):
    """(rows, 16) fp32 -> (lift, unlift): per row the powers of two 2^(141 - e) and
    2^(e - 141), e the biased exponent of the row's largest |value|, which lift it into
    [2^14, 2^15). As fp16 the lifted values are then rounded like tf32 (10 bits) at any
    magnitude, and cannot overflow (fp16 ends at 65504). e is kept in 15..254 so that both
    are normal floats; a zero row then stays zero, and inf or NaN stays itself."""
    e = (tl.max(tl.abs(zs), 1).to(tl.int32, bitcast=True) >> 23) & 0xFF
    e = tl.minimum(tl.maximum(e, 15), 254)
    return (((268 - e) << 23).to(tl.float32, bitcast=True),
            ((e - 14) << 23).to(tl.float32, bitcast=True))


@triton.jit
def _u_dot(z_ptr, stride_z, n_rows, words_ptr, sz_ptr, w_base, ld, lo, hi, s_base,
           n_gout, tile, C: tl.constexpr, GROUP: tl.constexpr, BLOCK_B: tl.constexpr,
           BLOCK_O: tl.constexpr, STAGES: tl.constexpr, FP16: tl.constexpr):
    """Batch 2–32, padded to 16/32 rows: (BLOCK_B, BLOCK_O) = z · Û over vectors lo..hi for
    one output tile inside one group (BLOCK_O divides the group size): a dot of z·scale
    with the exact codes, 16 vectors at a time, plus Σ z·zero. FP16: an fp16 dot of
    z·scale lifted per row and step by _row_lift (undone on its fp32 result), else a tf32
    dot of z·scale. Both round z·scale to 10 bits; fp16 codes are half the bytes of fp32
    ones on their way through shared memory to the tensor cores (which dot is faster
    depends on the shape: choose_config)."""
    PW: tl.constexpr = 32 // C
    BW: tl.constexpr = BLOCK_O // PW
    w = tile * BW + tl.arange(0, BW)
    wmask = w < ld
    grp = tile * BLOCK_O // GROUP
    j = tl.arange(0, 16)
    b = tl.arange(0, BLOCK_B)
    acc = tl.zeros((BLOCK_B, BLOCK_O), tl.float32)
    zero_sum = tl.zeros((BLOCK_B,), tl.float32)
    for j0 in tl.range(lo, hi, 16, num_stages=STAGES):
        rows = j0 + j
        rmask = rows < hi
        words = tl.load(words_ptr + w_base + rows[:, None] * ld + w[None, :],
                        mask=rmask[:, None] & wmask[None, :], other=0)       # (16, BW)
        smask = rmask & (rows * 0 + grp < n_gout)
        s, m = _scale_zero(tl.load(sz_ptr + s_base + rows * n_gout + grp, mask=smask, other=0))
        zt = tl.load(z_ptr + b[:, None] * stride_z + rows[None, :],
                     mask=(b[:, None] < n_rows) & rmask[None, :], other=0.0)  # (BLOCK_B, 16)
        zs = zt * s[None, :]
        if FP16:
            lift, unlift = _row_lift(zs)
            q = tl.reshape(_int_codes(words, C, tl.float16), (16, BLOCK_O))  # o = w·PW + k
            acc += tl.dot((zs * lift[:, None]).to(tl.float16), q) * unlift[:, None]
        else:
            q = tl.reshape(_int_codes(words, C), (16, BLOCK_O))
            acc = tl.dot(zs, q, acc, input_precision="tf32")
        zero_sum += tl.sum(zt * m[None, :], 1)
    return acc + zero_sum[:, None]


@triton.jit
def _reduce(val, acc_ptr, offs, mask, tile_items, lock_ptr):
    """A tile's reduction over its items: returns (is this program the last, the total).
    One item: its own value. Several: each adds its value into the zeroed fp32 workspace
    (atomics at L2) and counts in; the last one reads the sum, zeroes the workspace and the
    counter again, and writes the result. The tail is one L2 round trip however many items
    a tile has (partial sums read back one by one cost one per few items); the order of the
    adds, and so the last bits of the result, can differ from run to run."""
    last = tile_items == 1
    total = val
    if tile_items > 1:
        tl.atomic_add(acc_ptr + offs, val, mask=mask, sem="relaxed")
        tl.debug_barrier()                    # every thread's adds are issued ...
        count = tl.atomic_add(lock_ptr, 1, sem="release")   # ... before the release
        last = count == tile_items - 1
        if last:
            # Each count releases its program's adds; the acquire is on the reset, which
            # reads the last count and so follows every count (their release sequences).
            # An acq_rel count would make every program invalidate its L1.
            tl.atomic_xchg(lock_ptr, 0, sem="acquire")
            total = tl.load(acc_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(acc_ptr + offs, tl.zeros_like(val), mask=mask)
    return last, total


@triton.jit
def _launch_next(PDL: tl.constexpr):
    """Programmatic dependent launch (Hopper on): once every program of this kernel has
    passed here, the next kernel's programs may start as this one's finish, so its launch
    and its work-table reads overlap this kernel's tail. Where: see KernelConfig.early_next."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _wait_previous(PDL: tl.constexpr):
    """Under PDL, wait until the previous kernel has finished and its writes are visible;
    every program passes here before it reads anything a kernel wrote (x, z, the base
    output, the shared workspace). Reads of the work tables (copied from the host) may
    come before."""
    if PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def _program_item(segs_ptr, items_ptr, n_items):
    """This program's segment (its index, first row, rows), a pointer to its work item's row
    (a WorkItem) and the item's first three fields: container width, word base and row
    length of the band's words (both multiples of 16)."""
    seg = tl.program_id(0)
    tenant = tl.load(segs_ptr + seg * _SEG_COLS + _SEG_TENANT)
    row0 = tl.load(segs_ptr + seg * _SEG_COLS + _SEG_ROW0)
    n_rows = tl.load(segs_ptr + seg * _SEG_COLS + _SEG_ROWS)
    meta = items_ptr + (tenant * n_items + tl.program_id(1)) * _ITEM_COLS
    c = tl.load(meta + _C)
    w_base = tl.multiple_of(tl.load(meta + _WORDS), 16)
    ld = tl.multiple_of(tl.load(meta + _LD), 16)
    return seg, row0, n_rows, meta, c, w_base, ld


@triton.jit
def _item_span(meta):
    """The fields both phases read from an item's row: its reduction range lo..hi, scale
    base, the band's z column, its tile and the tile's item count (0: an empty padding
    item)."""
    return (tl.load(meta + _LO), tl.load(meta + _HI), tl.load(meta + _SZ),
            tl.load(meta + _Z_COL), tl.load(meta + _TILE), tl.load(meta + _TILE_ITEMS))


@triton.jit
def _item_columns(meta, n_out, FUSED: tl.constexpr, ALIGNED: tl.constexpr):
    """A phase-U item's member's first output column in y and its outputs: 0 and all n_out
    for a single member; in a fused layout read from the item, after the main loop, so
    they hold no register during it. ALIGNED: both are multiples of 16
    (KernelDelta.aligned_outputs), which the compiler must be told for the output tile's
    loads, stores and mask to take 16-byte vectors instead of one element each."""
    if FUSED:
        out0, n_member = tl.load(meta + _OUT0), tl.load(meta + _N_OUT)
        if ALIGNED:
            out0, n_member = tl.multiple_of(out0, 16), tl.multiple_of(n_member, 16)
    else:
        out0, n_member = 0, n_out
    return out0, n_member


@triton.jit
def _z_buffer(z_size, z_used, state_ptr):
    """Phase V's side of the two z buffers in the workspace: the offset of the one to add
    into. A launch's phase V adds into one buffer while phase U zeroes the other, which the
    launch before used, so no program has to wait for all others to finish reading z before
    it is zeroed. The turn is counted in the workspace's state (turn, the turn phase U
    reads, and how many floats each buffer was dirtied over); program 0 records it, and
    the z_used floats this launch will dirty."""
    turn = tl.load(state_ptr + _TURN)
    if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
        tl.store(state_ptr + _TURN_READ, turn)
        tl.store(state_ptr + _DIRTY + turn % 2, z_used)
    return (turn % 2) * z_size


@triton.jit
def _v_kernel(x_ptr, stride_x, n_in, words_ptr, sz_ptr, S_ptr, items_ptr, n_items,
              segs_ptr, z_ptr, stride_z, z_size, z_used, state_ptr, GROUP: tl.constexpr,
              STEP: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr,
              STAGES: tl.constexpr, WIDTHS: tl.constexpr,
              PDL: tl.constexpr, EARLY_NEXT: tl.constexpr):
    """Phase V: z[row, band column] = (x V̂)[row, ·] ⊙ S for each item of each segment. Each
    item adds its part, times S, into z (atomics at L2): one of two buffers, zero before the
    launch (_z_buffer). No counter, no fence and no last item's read-back, so a program's
    chain of round trips is its loads and one add.
    The container width must be a compile-time constant inside _v_fma / _v_dot: the unrolled
    loop over C = 1, 2, 4, 8 compiles one branch per width present in the bit mask WIDTHS."""
    if EARLY_NEXT:
        _launch_next(PDL)
    seg, row0, n_rows, meta, c, w_base, ld = _program_item(segs_ptr, items_ptr, n_items)
    lo, hi, s_base, z_col, tile, tile_items = _item_span(meta)
    r = tl.load(meta + _RANK)
    col0 = tl.multiple_of(tl.load(meta + _FIRST), BLOCK_J)
    S_base = tl.load(meta + _S)
    _wait_previous(PDL)                       # x and z are the last kernels'
    z_ptr += _z_buffer(z_size, z_used, state_ptr)
    if tile_items > 0:
        x_row = x_ptr + row0 * stride_x
        acc = tl.zeros((BLOCK_B, BLOCK_J), tl.float32)
        for i in tl.static_range(4):                  # container width C = 1 << i
            if WIDTHS & (1 << i):
                if c == (1 << i):
                    if BLOCK_B <= _FMA_ROWS:
                        acc = _v_fma(x_row, stride_x, n_in, words_ptr, sz_ptr, w_base,
                                     ld, r, col0, lo, hi, s_base, 1 << i, GROUP, STEP, BLOCK_B,
                                     BLOCK_J, STAGES)
                    else:
                        acc = _v_dot(x_row, stride_x, n_rows, n_in, words_ptr, sz_ptr, w_base,
                                     ld, r, col0, lo, hi, s_base, 1 << i, GROUP, STEP, BLOCK_B,
                                     BLOCK_J, STAGES)
        if not EARLY_NEXT:
            _launch_next(PDL)
        b = tl.arange(0, BLOCK_B)
        cols = col0 + tl.arange(0, BLOCK_J)
        mask = (b[:, None] < n_rows) & (cols[None, :] < r)
        offs = (row0 + b[:, None]) * stride_z + z_col + cols[None, :]
        S = tl.load(S_ptr + S_base + cols, mask=cols < r, other=0.0)
        tl.atomic_add(z_ptr + offs, acc * S[None, :], mask=mask, sem="relaxed")


@triton.jit
def _u_finish(val, o, row0, n_rows, n_out, meta, acc_ptr, tile_items, lock_ptr,
              y_ptr, stride_y, base_ptr, stride_base, order_ptr, HAS_BASE: tl.constexpr,
              BLOCK_B: tl.constexpr, FUSED: tl.constexpr, ALIGNED: tl.constexpr):
    """Sum an output tile's items (_reduce); the last program adds the base output and
    writes each row back to its place in the caller's batch (order). o are outputs of the
    item's member, which lie at columns out0.. of y's n_out (_item_columns)."""
    out0, n_member = _item_columns(meta, n_out, FUSED, ALIGNED)
    if BLOCK_B <= _FMA_ROWS:
        b = tl.arange(0, BLOCK_B)[:, None, None, None]           # val (BLOCK_B, ., ., .)
    else:
        b = tl.arange(0, BLOCK_B)[:, None]
    mask = (b < n_rows) & (o < n_member)
    col = out0 + o
    offs = (row0 + b) * n_out + col
    dst = tl.load(order_ptr + row0 + b, mask=b < n_rows, other=0)
    last, total = _reduce(val, acc_ptr, offs, mask, tile_items, lock_ptr)
    if last:
        if HAS_BASE:
            total += tl.load(base_ptr + dst * stride_base + col, mask=mask, other=0.0).to(
                tl.float32)
        tl.store(y_ptr + dst * stride_y + col, total.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _z_turn(z_ptr, z_size, state_ptr):
    """Phase U's side of the two z buffers (see _z_buffer): the offset of the one phase V
    used this launch. Meanwhile every program zeroes its share of the other one, as far as
    the launch before this one dirtied it, and program 0 passes the turn on (the next
    launch's phase V takes the other buffer)."""
    turn = tl.load(state_ptr + _TURN_READ)    # phase V's, this launch
    other = 1 - turn % 2
    n = tl.load(state_ptr + _DIRTY + other)   # floats the launch before added into `other`
    p = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    share = tl.cdiv(tl.cdiv(n, tl.num_programs(0) * tl.num_programs(1)), 64) * 64
    i = p * share + tl.arange(0, 64)
    for k in range(0, share, 64):
        tl.store(z_ptr + other * z_size + k + i, tl.zeros((64,), tl.float32),
                 mask=k + i < n)
    if p == 0:
        tl.store(state_ptr + _TURN, turn + 1)
    return (turn % 2) * z_size


@triton.jit
def _u_kernel(z_ptr, stride_z, z_size, n_out, n_gout, words_ptr, sz_ptr, items_ptr,
              n_items, segs_ptr, acc_ptr, y_ptr, stride_y, base_ptr,
              stride_base, order_ptr, locks_ptr, n_tiles, HAS_BASE: tl.constexpr,
              GROUP: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_O: tl.constexpr,
              STAGES: tl.constexpr, WIDTHS: tl.constexpr, PDL: tl.constexpr,
              EARLY_NEXT: tl.constexpr, U_FP16: tl.constexpr, FUSED: tl.constexpr,
              ALIGNED: tl.constexpr):
    """Phase U: y[row] = z[row] Ûᵀ (+ base[row]) for each item of each segment; z already
    holds S, in the z buffer phase V used (_z_turn). One branch per container width, as in
    _v_kernel. n_out: the columns of y (all members'); n_gout: the length of a scale row.
    An item's tile within its member (_FIRST) picks the words and scales it reads."""
    if EARLY_NEXT:
        _launch_next(PDL)
    seg, row0, n_rows, meta, c, w_base, ld = _program_item(segs_ptr, items_ptr, n_items)
    lo, hi, s_base, z_col, tile, tile_items = _item_span(meta)
    if FUSED:                                 # several members: the tile within its member
        u_tile = tl.load(meta + _FIRST)
    else:
        u_tile = tile
    lock = locks_ptr + _Z_STATE + seg * n_tiles + tile
    _wait_previous(PDL)                       # z, the base output, the workspace
    z_ptr += _z_turn(z_ptr, z_size, locks_ptr)
    z_row = z_ptr + row0 * stride_z + z_col
    if tile_items > 0:
        if BLOCK_B <= _FMA_ROWS:
            for i in tl.static_range(4):              # container width C = 1 << i
                if WIDTHS & (1 << i):
                    if c == (1 << i):       # values (rows, 32/C, words, slots), outputs
                        val, o = _u_fma(z_row, stride_z, words_ptr, sz_ptr, w_base,
                                        ld, lo, hi, s_base, n_gout, u_tile, 1 << i, GROUP,
                                        BLOCK_B, BLOCK_O, STAGES)
                        if not EARLY_NEXT:
                            _launch_next(PDL)
                        _u_finish(val, o, row0, n_rows, n_out, meta, acc_ptr, tile_items,
                                  lock, y_ptr, stride_y, base_ptr, stride_base, order_ptr,
                                  HAS_BASE, BLOCK_B, FUSED, ALIGNED)
        else:
            acc = tl.zeros((BLOCK_B, BLOCK_O), tl.float32)
            for i in tl.static_range(4):
                if WIDTHS & (1 << i):
                    if c == (1 << i):
                        acc = _u_dot(z_row, stride_z, n_rows, words_ptr, sz_ptr, w_base, ld,
                                     lo, hi, s_base, n_gout, u_tile, 1 << i, GROUP, BLOCK_B,
                                     BLOCK_O, STAGES, U_FP16)
            if not EARLY_NEXT:
                _launch_next(PDL)
            o = (u_tile * BLOCK_O + tl.arange(0, BLOCK_O))[None, :]
            _u_finish(acc, o, row0, n_rows, n_out, meta, acc_ptr, tile_items, lock, y_ptr,
                      stride_y, base_ptr, stride_base, order_ptr, HAS_BASE, BLOCK_B, FUSED,
                      ALIGNED)


# ----------------------------------------------------------------------------------------------
# Launch configuration and the launcher both wrappers share.

DOT_J, DOT_WARPS = 64, 4   # the tl.dot path: phase-V tile and warps


def _padded_rows(block_b: int, fma_rows: int) -> int:
    """The rows the kernels take a segment of block_b rows (a power of two) as: block_b on
    the FMA path (up to fma_rows), at least 16 on the tl.dot path."""
    return block_b if block_b <= fma_rows else max(block_b, 16)


@dataclass
class KernelConfig:
    """Tiling of one launch pair; `choose_config` picks one per shape, batch and grid.
    FMA-path programs (batch 1–2) are one warp: block_j vectors (phase V) and block_o
    outputs (phase U)."""
    split_v: int           # items per phase-V tile: its groups cut into this many chunks
    rows_u: int            # vectors per phase-U item (a multiple of 16)
    block_j: int = 64      # FMA path phase-V tile: 2 vectors a thread
    block_o: int = 1024    # FMA path phase-U tile: 32 outputs a thread at batch 1
    v_stages: int = 1      # software pipelining depth of the main loops (async copies;
    u_stages: int = 3      #   1: plain loads into registers), phase V and phase U
    waves: int = 0         # for the record: the programs per SM choose_config aimed at
    u_regs: int = 128      # FMA path phase U: registers per thread (0: the compiler's
                           #   choice); 128 fits 16 warps per SM instead of 12
    dot_u_warps: int = DOT_WARPS   # tl.dot path phase U: warps per program
    u_fp16: bool = True            # tl.dot path phase U: an fp16 dot, else tf32 (_u_dot)
    early_next: bool = False       # where a program lets the next kernel start (_launch_next):
                                   #   at its start, or after its main loop (see choose_config)
    fma_rows: int = FMA_ROWS       # segments of up to this many rows take the FMA path

    def rows(self, block_b: int) -> int:
        """The rows the kernels pad a plan's block_b-row segments to (block_rows): block_b,
        or 16 (the tl.dot path) where block_b is more than fma_rows."""
        return _padded_rows(block_b, self.fma_rows)

    def tiles(self, block_b: int, group_size: int) -> tuple[int, int, int, int]:
        """(phase-V tile, phase-U tile, phase-V warps, phase-U warps) for a launch of
        block_b rows. The tl.dot path's phase-U tile lies inside one quantization group."""
        if block_b <= FMA_ROWS:
            return self.block_j, self.block_o, 1, 1
        return DOT_J, math.gcd(group_size, 128), DOT_WARPS, self.dot_u_warps


def choose_config(kd: KernelDelta, block_b: int, sm_count: int, n_seg: int = 1,
                  waves: int | None = None, block_j: int | None = None,
                  block_o: int | None = None, v_stages: int | None = None,
                  u_stages: int | None = None, u_regs: int = 128,
                  dot_u_warps: int | None = None, u_fp16: bool | None = None
                  ) -> KernelConfig:
    """Cut both reductions until a launch over n_seg segments has ~`waves` programs per SM.
    A keyword argument overrides its rule (bench.py --sweep times the alternatives). The
    rules and why; the measurements behind each are in docs/PERFORMANCE.md:

    * 16 programs per SM (one warp each on the FMA path, four on the tl.dot path): one
      round, every program resident at once, so a phase takes about one program's chain of
      dependent memory round trips.
    * 64 for an FMA-path launch over tenant segments that read more than 64 MB between
      them: once the work is large, several rounds of smaller programs balance better.
    * Segments of 2 rows take the FMA path from 4096 outputs up: the rows share each code's
      mask, so a code costs one more FFMA, not a pass through the tl.dot layout; on
      narrower outputs the tl.dot path measured faster.
    * FMA-path phase-V tiles of 64 vectors, or 32 where 64-vector tiles of one group each
      would fill less than half the grid (short inputs, small ranks): more, smaller
      programs where there are too few.
    * FMA-path phase-U tiles of 1024 outputs, or 512 where 1024 would leave fewer than 2
      programs per SM; half that at 2 rows (16 outputs a thread, so both rows' sums fit
      128 registers).
    * Plain loads in phase V (every thread needs all of a step's x: async copies of it
      cost more shared memory than they hide), 3 async-copy stages in phase U; a single
      delta at batch 1 pipelines phase U 4 deep up to 16 MB and phase V 2 deep above
      (measured per shape; at batch 2 and for tenants the deeper pipelines were slower).
    * 128 registers a thread in FMA-path phase U: 16 warps fit an SM instead of 12.
    * tl.dot path: phase-U programs of 2 warps from 16384 outputs up (measured faster there,
      slower on narrower outputs); phase U's dot in fp16 from 8192 outputs up, where its
      halved shared-memory bytes pay for the per-row lift, tf32 below.
    * Under PDL, a grid of one round lets the next kernel start only after each program's
      main loop: started at once, the next kernel's programs crowd onto the SMs that free
      up first. A grid of several rounds (many tenants) lets it start at once."""
    fma_rows = FMA_ROWS if kd.shape[0] >= 4096 else 1
    block_b = _padded_rows(block_b, fma_rows)
    launch_bytes = n_seg * sum(kd.device_bytes) / len(kd.device_bytes)
    if waves is None:
        waves = 64 if block_b <= FMA_ROWS and n_seg > 1 and launch_bytes > 64 * 2**20 else 16
    one_row, large = block_b == 1 and n_seg == 1, launch_bytes > 16 * 2**20
    if v_stages is None:
        v_stages = 2 if one_row and large else 1
    if u_stages is None:
        u_stages = 4 if one_row and not large else 3
    target = max(1, waves * sm_count // n_seg)
    n_groups = -(-kd.shape[1] // kd.group_size)

    def v_tiles(bj):                                          # phase-V tiles, largest tenant
        return max(sum(-(-b.rank // bj) for b in bands) for bands in kd.bands)
    if block_j is None:
        block_j = 32 if block_b <= FMA_ROWS and v_tiles(64) * n_groups < target / 2 else 64

    def u_rows(bo):                                           # vectors per phase-U item
        return _pad16(-(-kd.max_rank // -(-target // -(-kd.shape[0] // bo))))
    if block_o is None:
        programs = -(-kd.shape[0] // 1024) * -(-kd.max_rank // u_rows(1024)) * n_seg
        block_o = (512 if programs < 2 * sm_count else 1024) // min(block_b, FMA_ROWS)
        #   (at 2 rows: 16 outputs a thread, 128 registers without spills)
    if dot_u_warps is None:
        dot_u_warps = 2 if kd.shape[0] >= 16384 else DOT_WARPS
    if u_fp16 is None:
        u_fp16 = kd.shape[0] >= 8192
    cfg = KernelConfig(1, 16, block_j, block_o, v_stages, u_stages, waves, u_regs, dot_u_warps,
                       u_fp16, early_next=waves > 16, fma_rows=fma_rows)
    bj, bo, _, _ = cfg.tiles(block_b, kd.group_size)
    cfg.split_v = max(1, min(n_groups, -(-target // max(1, v_tiles(bj)))))
    cfg.rows_u = u_rows(bo)
    return cfg


_WORKSPACES: dict = {}    # device -> (accumulator, counters, z buffer size)
_OUTGROWN: list = []      # replaced workspaces, kept alive: captured CUDA graphs may use them


def workspace(device, n_z: int, n_acc: int, n_locks: int
              ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The fp32 buffers and int32 counters the kernels share on `device`, at least this
    large: (accumulator, counters, z_size). The accumulator holds two z buffers of z_size
    ≥ n_z floats, then n_acc floats of phase-U partial sums; the counters start with the z
    buffers' state (Z_STATE int32s, see _z_buffer). Between launches the partial sums and
    the tile counters are zero (the last program of each tile resets its part) and the z
    buffer the next launch takes is zero, so one workspace serves every matrix; launches on
    one device must not overlap (one CUDA stream at a time). A larger request allocates a
    new workspace, so make one call of the largest shape and batch before capturing CUDA
    graphs."""
    key = str(torch.device(device))
    acc, locks, z_size = _WORKSPACES.get(key, (None, None, 0))
    if (acc is None or z_size < n_z or acc.numel() < 2 * z_size + n_acc
            or locks.numel() < n_locks):
        if acc is not None:
            _OUTGROWN.append((acc, locks))
        z_size = _pad16(max(n_z, z_size, 1 << 12))
        acc = torch.zeros(max(2 * z_size + n_acc, 1 << 16, 0 if acc is None else acc.numel()),
                          dtype=torch.float32, device=device)
        locks = torch.zeros(max(n_locks, 1024, 0 if locks is None else locks.numel()),
                            dtype=torch.int32, device=device)
        _WORKSPACES[key] = acc, locks, z_size
    return acc, locks, z_size


@functools.cache
def _triton_has_pdl() -> bool:
    """Whether this Triton has both halves of programmatic dependent launch: the
    griddepcontrol calls and the launch option."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return (hasattr(getattr(getattr(tl, "extra", None), "cuda", None), "gdc_wait")
            and "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {}))


def use_pdl(device) -> bool:
    """Programmatic dependent launch: on CUDA devices of compute capability 9.0 and up, with
    a Triton that has it, unless DELTACOME_PDL=0."""
    device = torch.device(device)
    return (device.type == "cuda" and os.environ.get("DELTACOME_PDL", "1") != "0"
            and _triton_has_pdl() and torch.cuda.get_device_capability(device)[0] >= 9)


def launch(x: torch.Tensor, kd: KernelDelta, plan: "TenantPlan", base,
           config: KernelConfig | None, in_place: bool = False) -> torch.Tensor:
    """x (B, in) fp16/bf16 contiguous, rows as in `plan` -> x Δ̂ₜᵀ (+ base) (B, out).

    base: None, a (B, out) tensor whose rows are contiguous, or a callable that returns one,
    called once, after the first phase-V launch and before the first phase-U launch (so
    that the caller can make the base output meanwhile: run_overlapped). in_place: write the
    result into base and return it."""
    B, in_f = x.shape
    out_f = kd.shape[0]
    if in_place and base is None:
        raise ValueError("in_place needs a base output to add into")
    y = None if in_place else torch.empty(B, out_f, dtype=x.dtype, device=x.device)
    if not any(kd.ranks):
        base = base() if callable(base) else base
        if in_place:
            return base
        return y.copy_(base) if base is not None else y.zero_()
    xs = x if plan.is_sorted else x.index_select(0, plan.order)              # (B, in) sorted
    sm = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
    widths = sum(kd.containers)             # distinct powers of two: a bit mask
    pdl = use_pdl(x.device)
    launch_opts = {"launch_pdl": True} if pdl else {}
    z_width = kd.z_width                    # floats a row of z takes
    for block_b, segs, n_seg in plan.groups:
        cfg = config or choose_config(kd, block_b, sm, n_seg)
        block_b = cfg.rows(block_b)
        bj, bo, v_warps, u_warps = cfg.tiles(block_b, kd.group_size)
        if (cfg.rows_u % 16 or cfg.split_v < 1 or min(cfg.v_stages, cfg.u_stages) < 1
                or not (bj >= 16 and bo >= 32 and triton.next_power_of_2(bj) == bj
                        and triton.next_power_of_2(bo) == bo)
                or cfg.dot_u_warps not in (1, 2, 4, 8) or not 1 <= cfg.fma_rows <= FMA_ROWS):
            raise ValueError(f"{cfg}: need split_v ≥ 1, rows_u a multiple of 16, stages ≥ 1, "
                             f"block_j and block_o powers of two ≥ 16 and ≥ 32, dot_u_warps "
                             f"1, 2, 4 or 8, fma_rows 1 to {FMA_ROWS}")
        v_items, n_v, _ = kd.v_items(bj, cfg.split_v)
        u_items, n_u, u_tiles = kd.u_items(bo, cfg.rows_u)
        # Two z buffers (zero but for what the last launch left in one, see _z_buffer),
        # then phase U's partial sums; the counters after the z state.
        acc, locks, z_size = workspace(x.device, B * z_width, B * out_f,
                                       Z_STATE + n_seg * u_tiles)
        # Phase V's steps: 64 positions, or 32 where the group size needs it and at 2 rows
        # on the FMA path (two rows of 64 lifted x do not fit a thread's registers)
        step = 32 if kd.group_size % 64 or 1 < block_b <= FMA_ROWS else 64
        try:
            _v_kernel[(n_seg, n_v)](
                xs, xs.stride(0), in_f, kd.v_words, kd.v_sz, kd.S, v_items, n_v, segs, acc,
                z_width, z_size, B * z_width, locks, GROUP=kd.group_size,
                STEP=step, BLOCK_B=block_b, BLOCK_J=bj,
                STAGES=cfg.v_stages, WIDTHS=widths, PDL=pdl, EARLY_NEXT=cfg.early_next,
                num_warps=v_warps, **launch_opts)
            if callable(base):
                base = base()                                       # (B, out)
            y = base if in_place else y
            base_arg = base if base is not None else y
            _u_kernel[(n_seg, n_u)](
                acc, z_width, z_size, out_f, kd.u_groups, kd.u_words,
                kd.u_sz, u_items, n_u, segs, acc[2 * z_size:], y, y.stride(0), base_arg,
                base_arg.stride(0), plan.order, locks, u_tiles,
                HAS_BASE=base is not None, GROUP=kd.group_size, BLOCK_B=block_b, BLOCK_O=bo,
                STAGES=cfg.u_stages, WIDTHS=widths, PDL=pdl, EARLY_NEXT=cfg.early_next,
                # (only the tl.dot path reads U_FP16: one FMA-path compile for both values)
                U_FP16=cfg.u_fp16 and block_b > FMA_ROWS, FUSED=len(kd.outputs) > 1,
                ALIGNED=len(kd.outputs) > 1 and kd.aligned_outputs,
                num_warps=u_warps,
                maxnreg=cfg.u_regs if cfg.u_regs and block_b <= FMA_ROWS else None,
                **launch_opts)
        except BaseException:
            acc.zero_()                     # a launch that did not finish leaves z unclean
            locks.zero_()
            raise
    return y


# ==============================================================================================
# WRAPPERS: the checks, the choice of backend, delta_matmul.

BACKENDS = ("auto", "triton", "simple", "reference")


def _backend_for(x: torch.Tensor, backend: str) -> str:
    """"auto" -> "triton" for fp16/bf16 CUDA tensors, else "reference"; others as given."""
    if backend != "auto":
        return backend
    return "triton" if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) else "reference"


def resolve_backend(x: torch.Tensor, shape: tuple[int, int], base: torch.Tensor | None,
                    backend: str) -> str:
    """The checks both wrappers share: x (..., in) and base (..., out) against the delta's
    (out, in) shape, then "auto" -> "triton" (fp16/bf16 CUDA tensors) or "reference", and
    for the Triton backends, x's dtype and device. Returns "triton", "simple" or
    "reference"."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got "
                         f"{backend!r}")
    out_f, in_f = shape
    if x.ndim == 0 or x.shape[-1] != in_f:
        raise ValueError(f"x has shape {tuple(x.shape)}; the delta expects (..., {in_f})")
    if base is not None and (base.shape != (*x.shape[:-1], out_f) or base.device != x.device):
        raise ValueError(f"base has shape {tuple(base.shape)} on {base.device}; expected "
                         f"{(*x.shape[:-1], out_f)} on {x.device}")
    backend = _backend_for(x, backend)
    if backend == "triton" and x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"the Triton kernels take fp16 or bf16 x, got {x.dtype}")
    if backend == "simple" and x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"the simple kernel takes fp16, bf16 or fp32 x, got {x.dtype}")
    if (backend in ("triton", "simple") and not x.is_cuda
            and os.environ.get("TRITON_INTERPRET") != "1"):
        raise ValueError(f"backend={backend!r} needs CUDA tensors (or TRITON_INTERPRET=1 set "
                         f"before triton is imported)")
    return backend


def rows_per_launch(shape: tuple[int, int]) -> int:
    """The chunks delta_matmul cuts a batch of up to 2·MAX_BATCH rows into: MAX_BATCH rows,
    or 16 from 14336 outputs up, where phase U's 32-row tiles measured slower than two
    launches of 16 rows (docs/PERFORMANCE.md). Larger batches run as one launch over
    MAX_BATCH-row segments; tenant plans keep MAX_BATCH: one plan serves every layer."""
    return 16 if shape[0] >= 14336 else MAX_BATCH


def delta_matmul(x: torch.Tensor, delta: CompressedMatrix | KernelDelta,
                 base: torch.Tensor | None = None, backend: str = "auto",
                 config: KernelConfig | None = None) -> torch.Tensor:
    """x (..., in) -> x Δ̂ᵀ (..., out), plus `base` (..., out) if given, in x.dtype.

    backend: "auto" = the tuned kernels for fp16/bf16 CUDA tensors, the reference
    otherwise; "triton" = the tuned kernels, "simple" = the simple kernel (both also on CPU
    tensors under TRITON_INTERPRET=1); "reference". A CompressedMatrix is repacked on every
    tuned-kernel call: prepare it once with `prepare_delta` (DeltaLinear does) to serve it.
    The simple kernel and the reference take the CompressedMatrix, on x's device."""
    out_f, in_f = delta.shape
    backend = resolve_backend(x, delta.shape, base, backend)
    if backend in ("reference", "simple"):
        if isinstance(delta, KernelDelta):
            raise ValueError(f"the {backend} backend needs the CompressedMatrix, "
                             f"not a KernelDelta")
        if backend == "simple":
            return delta_matmul_simple(x, delta, base)
        y = delta_matmul_reference(x, delta)
        return y if base is None else base + y
    kd = delta if isinstance(delta, KernelDelta) else prepare_delta(delta, x.device)
    if kd.n_tenants != 1:
        raise ValueError(f"the prepared delta holds {kd.n_tenants} tenants: use "
                         f"multi_delta_matmul")
    if kd.S.device != x.device:
        raise ValueError(f"the prepared delta is on {kd.S.device}, x on {x.device}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_f).contiguous()                                   # (B, in)
    if x2.shape[0] == 0:
        return x.new_zeros(*lead, out_f)
    b2 = None if base is None else base.reshape(-1, out_f).contiguous()
    chunks = []
    # A prefill-sized batch runs as one launch over the plan's MAX_BATCH-row segments:
    # a launch per chunk would cost more than the kernels themselves.
    step = rows_per_launch(kd.shape) if x2.shape[0] <= 2 * MAX_BATCH else x2.shape[0]
    for i in range(0, x2.shape[0], step):
        xc = x2[i:i + step]
        chunks.append(launch(xc, kd, single_plan(kd, xc.shape[0], x.device),
                             None if b2 is None else b2[i:i + step], config))
    y = torch.cat(chunks) if len(chunks) != 1 else chunks[0]
    return y.reshape(*lead, out_f)


def single_plan(kd: KernelDelta, rows: int, device) -> TenantPlan:
    """The plan of `rows` rows of a one-tenant KernelDelta, made once and cached with it
    (one tenant: the plan depends on the row count only)."""
    key = ("plan", rows)
    if key not in kd._tables:
        kd._tables[key] = plan_tenants(torch.zeros(rows, dtype=torch.int64), 1, device)
    return kd._tables[key]


# ==============================================================================================
# SERVING ONE FINE-TUNE: one layer, then a whole model.


class DeltaLinear(torch.nn.Module):
    """A base nn.Linear plus one matrix's compressed delta: forward(x) = base(x) + x Δ̂ᵀ.

    backend as delta_matmul's. The tuned kernels prepare the delta on first use on a device
    (a one-time repack); the simple kernel and the reference move it there once. The base
    layer's parameters are shared, not copied."""

    def __init__(self, base: torch.nn.Linear, delta: CompressedMatrix, backend: str = "auto"):
        super().__init__()
        if tuple(base.weight.shape) != tuple(delta.shape):
            raise ValueError(f"base weight is {tuple(base.weight.shape)}, delta is "
                             f"{tuple(delta.shape)}")
        self.base, self.delta, self.backend = base, delta, backend
        self._prepared: KernelDelta | None = None
        self.group: DeltaGroup | None = None    # set by serving_options
        self.overlap = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        backend = _backend_for(x, self.backend)
        if backend != "triton":                  # the simple kernel or the reference
            if self.delta.bands and self.delta.bands[0].S.device != x.device:
                self.delta = self.delta.to(x.device)
            return delta_matmul(x, self.delta, self.base(x), backend=backend)
        if self.group is not None:
            return self.group.output(self, x)
        kd = self.kernel_delta(x.device)
        if self.overlap:
            plan = single_plan(kd, math.prod(x.shape[:-1]), x.device)
            return serve_layers(x, [self.base], kd, plan, overlap=True)[0]
        return delta_matmul(x, kd, self.base(x), backend="triton")

    def kernel_delta(self, device) -> KernelDelta:
        """The delta in the kernels' layout on `device`, prepared on first use."""
        if self._prepared is None or self._prepared.S.device != torch.device(device):
            self._prepared = prepare_delta(self.delta, device)
        return self._prepared

    def extra_repr(self) -> str:
        bands = ",".join(f"{b.bits}:{b.rank}" for b in self.delta.bands) or "empty"
        return f"bands={bands}, backend={self.backend}"


def patch_model(model: torch.nn.Module, delta_path, backend: str = "auto", fuse: bool = True,
                overlap: bool = False) -> list[str]:
    """Turn `model` (holding the BASE weights) into the fine-tune in place: every compressed
    projection NAME.weight swaps the nn.Linear at NAME for a DeltaLinear, and every carried
    tensor is copied into the parameter or buffer of that name. Vocabulary tensors
    (embeddings, lm_head) are merged into the model's weights: a compressed one as
    W + Δ̂ (an embedding lookup has no product for a delta path to save, and a tied lm_head
    shares the embedding's weight, so it follows), stored rows written in; a resized
    vocabulary grows the weights (and config.vocab_size) to FT's rows. Returns the names of
    the matrices served by a DeltaLinear. Names are the checkpoint's (e.g.
    model.layers.0.self_attn.q_proj.weight). fuse and overlap: see serving_options.

    All or nothing: the file is checked when read (deltacome.read_delta_file), then every
    change is checked against the model and built (a ModelPatch) before any is made; a
    corrupt file, or one that does not fit the model, raises DeltaComeError and leaves the
    model as it was."""
    delta = read_delta_file(delta_path)
    check_model(model, delta, delta_path, grow=True)
    patch = ModelPatch(model, delta_path)
    vocab = plan_vocabulary(patch, delta)
    copy_carried(patch, {n: t for n, t in delta.carried.items() if n not in vocab})
    for name, cm in delta.matrices.items():
        if name not in vocab:
            replace_linear(patch, name, lambda layer: DeltaLinear(layer, cm, backend))
    patch.commit()
    set_serving_options(model, fuse, overlap)
    return [n for n in delta.matrices if n not in vocab]


def check_model(model: torch.nn.Module, delta: DeltaFile, source, grow: bool) -> None:
    """The model is the base `source` was made against: every tensor the file changes is in
    the model in BASE's shape (grow: a vocabulary tensor may have fewer rows, FT's resized
    vocabulary), and the model's values at the file's base probes (deltacome.probe) are
    BASE's up to rounding to the model's dtype. One-line DeltaComeError otherwise."""
    state = model.state_dict(keep_vars=True)
    shapes = {n: cm.shape for n, cm in delta.matrices.items()}
    shapes.update({n: (r.base_rows, *r.shape[1:]) for n, r in delta.rows.items()})
    for name, shape in [*shapes.items(), *((n, tuple(t.shape)) for n, t in delta.carried.items())]:
        if name not in state:
            raise DeltaComeError(f"{source}: tensor {name} is not in the model (a delta file "
                                 f"made for another model?)")
        have = tuple(state[name].shape)
        grows = name in delta.rows and delta.rows[name].shape[0] > have[0] or \
            name in delta.carried and shape[1:] == have[1:] and shape[0] > have[0]
        if have != tuple(shape) and not (name in delta.carried and grows):
            raise DeltaComeError(f"tensor {name}: {have} in the model but {tuple(shape)} in BASE "
                                 f"of {source} (a delta file made for another model?)")
        if not grow and (grows or name in delta.rows and delta.rows[name].shape[0] != have[0]):
            raise DeltaComeError(f"tensor {name}: {source} resizes the vocabulary to "
                                 f"{(delta.rows.get(name) or delta.carried[name]).shape[0]} rows "
                                 f"from {have[0]}: tenants of one model must keep BASE's")
    for name, values in delta.meta.get("base_probes", {}).items():
        if name in state and not probes_match(values, probe(state[name].detach()),
                                              state[name].dtype):
            raise DeltaComeError(f"tensor {name}: the model's values are not those of the base "
                                 f"{source} was made against")


def plan_vocabulary(patch: "ModelPatch", delta: DeltaFile) -> set[str]:
    """Plan a delta file's vocabulary tensors into the model: a compressed one as W + Δ̂
    (summed in fp32, over BASE's rows), stored rows written in, and a resized vocabulary's
    tensors grown to FT's rows (a carried one taken whole). Returns the tensor names planned,
    which the other steps of patch_model leave alone."""
    state = patch.model.state_dict(keep_vars=True)
    names = {n for n in delta.matrices if delta.role(n) == "vocab"} | set(delta.rows) | \
        {n for n, t in delta.carried.items() if tuple(t.shape) != tuple(state[n].shape)}
    for name in sorted(names):
        w = state[name].detach()
        if name in delta.carried:                       # a grown vocabulary, carried whole
            new = delta.carried[name].to(w.device, w.dtype)
        else:                                           # as deltacome.apply merges it
            new = w
            if name in delta.matrices:
                new = (w.float() + decompress_matrix(delta.matrices[name].to(w.device))
                       ).to(w.dtype)
            if name in delta.rows:
                new = place_rows(new, delta.rows[name])                      # FT's rows
        if new.shape == w.shape:
            patch.copies.append((state[name], new))
        else:
            patch.grows.append((state[name], new))
    return names


def grow_parameter(model: torch.nn.Module, old: torch.nn.Parameter, value: torch.Tensor):
    """Put `value` (more rows than `old`: FT's resized vocabulary) in place of the parameter
    `old` in every module that holds it (a tied lm_head holds the embedding's);
    nn.Embedding / nn.Linear sizes and config.vocab_size follow."""
    new = torch.nn.Parameter(value, requires_grad=old.requires_grad)
    for module in model.modules():
        for pname, p in list(module.named_parameters(recurse=False)):
            if p is old:
                setattr(module, pname, new)
                if isinstance(module, torch.nn.Embedding):
                    module.num_embeddings = value.shape[0]
                elif isinstance(module, torch.nn.Linear) and pname == "weight":
                    module.out_features = value.shape[0]
    config = getattr(model, "config", None)
    if getattr(config, "vocab_size", None) == old.shape[0]:
        config.vocab_size = value.shape[0]


@dataclass
class ModelPatch:
    """Changes to a model, planned (checked and built) before any is made: `copy_carried` and
    `replace_linear` add to the plan and raise DeltaComeError on anything that does not
    fit, leaving the model untouched; `commit` then makes every change, and only assigns
    what was already built (copies of tensors already in the target's dtype and device,
    modules already constructed), so it does not fail halfway."""
    model: torch.nn.Module
    source: object                                  # the delta file(s), named in errors
    copies: list = field(default_factory=list)      # (model tensor, value to copy into it)
    swaps: dict = field(default_factory=dict)       # module path -> its replacement
    grows: list = field(default_factory=list)       # (parameter, value with more rows)

    def commit(self) -> None:
        with torch.no_grad():
            for target, value in self.copies:
                target.copy_(value)
        for old, value in self.grows:
            grow_parameter(self.model, old, value)
        for path, module in self.swaps.items():
            parent, _, child = path.rpartition(".")
            setattr(self.model.get_submodule(parent) if parent else self.model, child, module)


def copy_carried(patch: ModelPatch, carried: dict) -> None:
    """Plan copying a delta file's carried tensors (FT's norms, embeddings, ...) into the
    model's parameters or buffers of the same names: each must exist with the same shape,
    and be floating point where the carried tensor is (else of its very dtype)."""
    state = patch.model.state_dict(keep_vars=True)
    for name, tensor in carried.items():
        if name not in state:
            raise DeltaComeError(f"{patch.source}: carried tensor {name} is not in the model")
        target = state[name]
        if target.shape != tensor.shape:
            raise DeltaComeError(f"carried tensor {name}: {tuple(tensor.shape)} in the delta "
                                 f"file, {tuple(target.shape)} in the model")
        if (target.is_floating_point() != tensor.is_floating_point()
                or not tensor.is_floating_point() and target.dtype != tensor.dtype):
            raise DeltaComeError(f"carried tensor {name}: {tensor.dtype} in the delta file, "
                                 f"{target.dtype} in the model")
        patch.copies.append((target, tensor.to(target.device, target.dtype)))


def replace_linear(patch: ModelPatch, name: str, make) -> None:
    """Plan swapping the nn.Linear that holds matrix `name` (NAME.weight) for make(that
    Linear), built now; make's ValueError (e.g. a shape that does not fit) becomes a
    DeltaComeError."""
    source = patch.source
    if not name.endswith(".weight"):
        raise DeltaComeError(f"{source}: matrix {name} is not a '.weight' tensor")
    path = name.removesuffix(".weight")
    try:
        layer = patch.model.get_submodule(path)
    except AttributeError:
        raise DeltaComeError(f"{source}: the model has no module {path} (for {name})")
    if isinstance(layer, (DeltaLinear, TenantModule)) or path in patch.swaps:
        raise DeltaComeError(f"{path} is already patched")
    if not isinstance(layer, torch.nn.Linear):
        raise DeltaComeError(f"{path} is a {type(layer).__name__}, not an nn.Linear")
    try:
        patch.swaps[path] = make(layer)
    except ValueError as e:
        raise DeltaComeError(f"{source}: {path}: {e}") from None


# ==============================================================================================
# MULTI-TENANT SERVING: one base, N compressed fine-tunes of it, one batch. Row b of a batch
# belongs to tenant t = tenant_idx[b]:
#
#     y[b] = x[b] Wᵀ + ((x[b] V̂ₜ) ⊙ Sₜ) Ûₜᵀ
#
# The base GEMM runs once for the whole batch; the delta paths of all tenants run in one
# launch pair per matrix (or one per row-padding bucket present, see the plan) of the same
# kernels as a single delta, and each tenant's packed bytes are read once per batch however
# many of its rows the batch holds (once per MAX_BATCH = 32 rows beyond that).
#
# * Plan. Rows are sorted by tenant (stable) and cut into segments of one tenant and ≤ 32
#   rows. Segments of 1–2 rows take the FMA path (2 only from 4096 outputs up, see
#   choose_config), longer ones the tl.dot path padded to 16/32 rows; one launch pair per
#   padding present, so 64 tenants × 1 token is one pair and never pays for tensor-core
#   tiles. The plan needs the indices on the host: a
#   serving loop has them there; a CUDA index costs one sync, once per batch (use_tenants
#   makes one plan per batch for every layer).
# * Grid (segment, item). Item tables are per tenant, padded to the largest tenant's count
#   with empty items, so only the plan's segment table (tenant, first row, rows) changes per
#   batch: no per-call table, no sync, capturable in a CUDA graph.
# * Rows not sorted by tenant are gathered into sorted order before phase V (one
#   index_select, skipped when already sorted); phase U writes each output row back to its
#   original position through the plan's order table and reads the fused base output the
#   same way.
#
# Real full fine-tunes also differ outside the projections: norms, biases, embeddings and
# lm_head. Those are per tenant too (see "Per-tenant tensors outside the projections").
# The kernels share one split workspace per device (`workspace`): one CUDA stream at a time.

# Multi-tenant reference: one delta_matmul_reference per tenant present, rows scattered back.


def check_tenant_idx(tenant_idx, lead: tuple, n_tenants: int) -> torch.Tensor:
    """tenant_idx (tensor or sequence) -> int64 CPU tensor of shape `lead`, values checked."""
    idx = torch.as_tensor(tenant_idx)
    if idx.dtype.is_floating_point or idx.dtype == torch.bool or idx.is_complex():
        raise ValueError(f"tenant_idx must hold integers, got {idx.dtype}")
    if tuple(idx.shape) != tuple(lead):
        raise ValueError(f"tenant_idx has shape {tuple(idx.shape)}; expected one index per row "
                         f"of x, shape {tuple(lead)}")
    idx = idx.to("cpu", torch.int64)       # a CUDA index costs one sync here
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n_tenants):
        bad = idx[(idx < 0) | (idx >= n_tenants)][0]
        raise ValueError(f"tenant_idx holds {int(bad)}, outside [0, {n_tenants}) "
                         f"({n_tenants} deltas)")
    return idx


def multi_delta_matmul_reference(x: torch.Tensor, deltas: Sequence[CompressedMatrix],
                                 tenant_idx, matmul=delta_matmul_reference) -> torch.Tensor:
    """x (..., in), tenant_idx (...) -> (..., out), row b = delta_{tenant_idx[b]}(x[b]),
    each tenant's rows through matmul(rows, delta) (the reference, or the simple kernel) in
    x.dtype."""
    out_f, in_f = deltas[0].shape
    idx = check_tenant_idx(tenant_idx, x.shape[:-1], len(deltas)).reshape(-1)
    x2 = x.reshape(-1, in_f)                                                  # (B, in)
    y = x2.new_zeros(x2.shape[0], out_f)                                      # (B, out)
    for t in idx.unique().tolist():
        rows = (idx == t).nonzero().squeeze(1).to(x.device)
        y[rows] = matmul(x2[rows], deltas[t])
    return y.reshape(*x.shape[:-1], out_f)


# ----------------------------------------------------------------------------------------------
# The plan: a batch's rows grouped by tenant, once per batch.


@dataclass
class TenantPlan:
    """Rows of one batch grouped by tenant, on one device.

    order (B,) int32: sorted position -> original row (stable sort by tenant).
    groups: one (block_b, segments, n_seg) per row padding present; segments (n_seg, 3) int32
    rows [tenant, first sorted row, rows], rows ≤ MAX_BATCH, every row in exactly one."""
    n_rows: int
    n_tenants: int
    rows_per_tenant: tuple[int, ...]
    order: torch.Tensor
    is_sorted: bool
    groups: list = field(default_factory=list)

    @property
    def used(self) -> int:
        return sum(1 for n in self.rows_per_tenant if n)


def block_rows(rows: int) -> int:
    """The rows a segment of `rows` rows is padded to: none on the FMA path (1 or 2 rows; its
    kernels read every row they hold), 16 or 32 on the tl.dot path."""
    return _padded_rows(triton.next_power_of_2(rows), FMA_ROWS)


def plan_tenants(tenant_idx, n_tenants: int, device) -> TenantPlan:
    """tenant_idx (B,) ints in [0, n_tenants) -> TenantPlan on `device`."""
    shape = tuple(torch.as_tensor(tenant_idx).shape)
    if len(shape) != 1:
        raise ValueError(f"plan_tenants takes a 1-D tenant_idx, got shape {shape}")
    idx = check_tenant_idx(tenant_idx, shape, n_tenants)                      # (B,)
    order = torch.argsort(idx, stable=True)                                   # (B,)
    counts = torch.bincount(idx, minlength=n_tenants).tolist()
    buckets: dict[int, list] = {}
    start = 0
    for t, n in enumerate(counts):
        for s in range(start, start + n, MAX_BATCH):
            rows = min(MAX_BATCH, start + n - s)
            block_b = block_rows(rows)
            buckets.setdefault(block_b, []).append(Segment(t, s, rows))
        start += n
    groups = [(bb, torch.tensor(segs, dtype=torch.int32, device=device), len(segs))
              for bb, segs in sorted(buckets.items())]
    return TenantPlan(idx.numel(), n_tenants, tuple(counts),
                      order.to(device, torch.int32),
                      bool(torch.equal(order, torch.arange(idx.numel()))), groups)


def multi_delta_matmul(x: torch.Tensor, deltas: KernelDelta | Sequence[CompressedMatrix],
                       tenant_idx=None, base: torch.Tensor | None = None, backend: str = "auto",
                       plan: TenantPlan | None = None,
                       config: KernelConfig | None = None) -> torch.Tensor:
    """x (..., in), tenant_idx (...) ints in [0, N) -> (..., out): row b gets
    x[b] Δ̂_{tenant_idx[b]}ᵀ, plus `base` (..., out) if given, in x.dtype.

    backend as delta_matmul: "auto" = the tuned kernels for fp16/bf16 CUDA tensors, else
    the reference; "triton" (also CPU tensors under TRITON_INTERPRET=1); "simple" and
    "reference" (a loop over the tenants present; they need the CompressedMatrix list). `plan` (plan_tenants of the flattened index) may be passed instead
    of tenant_idx to reuse one plan across the layers of a forward pass."""
    n = deltas.n_tenants if isinstance(deltas, KernelDelta) else len(deltas)
    if n == 0:
        raise ValueError("no deltas given")
    out_f, in_f = deltas.shape if isinstance(deltas, KernelDelta) else deltas[0].shape
    backend = resolve_backend(x, (out_f, in_f), base, backend)
    if (tenant_idx is None) == (plan is None):
        raise ValueError("give exactly one of tenant_idx and plan")
    lead = x.shape[:-1]
    if backend in ("reference", "simple"):
        if isinstance(deltas, KernelDelta):
            raise ValueError(f"the {backend} backend needs the CompressedMatrix list, "
                             f"not a KernelDelta")
        if tenant_idx is None:
            raise ValueError(f"the {backend} backend takes tenant_idx, not a plan")
        y = multi_delta_matmul_reference(x, deltas, tenant_idx, delta_matmul_simple
                                         if backend == "simple" else delta_matmul_reference)
        return y if base is None else base + y
    md = deltas if isinstance(deltas, KernelDelta) else prepare_multi_delta(deltas,
                                                                                 x.device)
    if md.S.device != x.device:
        raise ValueError(f"the prepared deltas are on {md.S.device}, x on {x.device}")
    B = math.prod(lead)
    if plan is None:
        plan = plan_tenants(check_tenant_idx(tenant_idx, lead, n).reshape(-1), n, x.device)
    if plan.n_rows != B or plan.n_tenants != n or plan.order.device != x.device:
        raise ValueError(f"the plan is for {plan.n_rows} rows of {plan.n_tenants} tenants on "
                         f"{plan.order.device}; x has {B} rows, there are {n} deltas, on "
                         f"{x.device}")
    if B == 0:
        return x.new_zeros(*lead, out_f) if base is None else base.clone()
    x2 = x.reshape(B, in_f).contiguous()
    b2 = None if base is None else base.reshape(B, out_f).contiguous()
    return launch(x2, md, plan, b2, config).reshape(*lead, out_f)


# ----------------------------------------------------------------------------------------------
# Serving N fine-tunes of one base: one layer, then a whole model.


class TenantBatch:
    """The tenant of every sequence (or every row) of one batch, with its plans cached by
    row layout: every tenant module of a forward pass sees the same rows, so the plan is
    made once. tenant_idx: one index per sequence, shape (batch,), or one per row, shape
    x.shape[:-1] of the inputs it serves."""

    def __init__(self, tenant_idx, n_tenants: int):
        shape = tuple(torch.as_tensor(tenant_idx).shape)
        if not shape:
            raise ValueError("tenant_idx must have one index per sequence (or per row), "
                             "not be a scalar")
        self.idx = check_tenant_idx(tenant_idx, shape, n_tenants)         # (batch, ...)
        self.n_tenants = n_tenants
        self._plans: dict = {}

    def rows(self, lead: tuple) -> torch.Tensor:
        """The index -> one index per row of an input with leading shape `lead`, (B,)."""
        k = self.idx.ndim
        if tuple(lead[:k]) != tuple(self.idx.shape):
            raise ValueError(f"tenant indices of shape {tuple(self.idx.shape)} for an input of "
                             f"leading shape {tuple(lead)}: give one per sequence (dim 0) or "
                             f"one per row")
        return self.idx.view(*self.idx.shape, *[1] * (len(lead) - k)).expand(lead).reshape(-1)

    def plan(self, lead: tuple, device) -> TenantPlan:
        key = (tuple(lead), str(device))
        if key not in self._plans:
            self._plans[key] = plan_tenants(self.rows(lead), self.n_tenants, device)
        return self._plans[key]

    def rows_on(self, lead: tuple, device) -> torch.Tensor:
        """rows(lead) on `device`, (B,) int64, cached like the plans (one copy a batch)."""
        key = ("rows", tuple(lead), str(device))
        if key not in self._plans:
            self._plans[key] = self.rows(lead).to(device)
        return self._plans[key]


class TenantModule(torch.nn.Module):
    """A layer that serves N tenants in one batch. `tenants` is the TenantBatch set by
    `use_tenants` (how a patched model is called); forward may also take tenant_idx."""

    def __init__(self, n_tenants: int):
        super().__init__()
        self.n_tenants = n_tenants
        self.tenants: TenantBatch | None = None

    def tenant_batch(self, tenant_idx=None) -> TenantBatch:
        """The batch's tenants: tenant_idx if given, else the ones `use_tenants` set."""
        if tenant_idx is not None:
            return TenantBatch(tenant_idx, self.n_tenants)
        if self.tenants is None:
            raise ValueError(f"{type(self).__name__} needs tenant_idx: pass it, or call the "
                             f"model inside `with use_tenants(model, tenant_idx):`")
        return self.tenants


class MultiDeltaLinear(TenantModule):
    """A base nn.Linear plus N compressed deltas of its weight:
    forward(x, tenant_idx)[b] = base(x[b]) + x[b] Δ̂_{tenant_idx[b]}ᵀ (+ the tenant's bias
    delta and row deltas where given: see TenantTerms).

    tenant_idx: one index per row (shape x.shape[:-1]) or per sequence (shape x.shape[:1]);
    None uses the batch set by `use_tenants` (how a patched model is called). The base GEMM
    runs once for the whole batch; the deltas are prepared for the kernels on first use on a
    CUDA device (a one-time repack); the base layer's parameters are shared, not copied."""

    def __init__(self, base: torch.nn.Linear, deltas: Sequence[CompressedMatrix],
                 backend: str = "auto", bias_deltas: torch.Tensor | None = None,
                 row_deltas: Sequence | None = None):
        if not deltas:
            raise ValueError("MultiDeltaLinear needs at least one delta")
        for t, cm in enumerate(deltas):
            if tuple(base.weight.shape) != tuple(cm.shape):
                raise ValueError(f"base weight is {tuple(base.weight.shape)}, delta {t} is "
                                 f"{tuple(cm.shape)}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got "
                             f"{backend!r}")
        super().__init__(len(deltas))
        self.base, self.deltas, self.backend = base, list(deltas), backend
        self.extra = TenantTerms(base.weight.shape[0], bias_deltas, row_deltas, len(deltas))
        self._prepared: KernelDelta | None = None
        self.group: DeltaGroup | None = None    # set by serving_options
        self.overlap = False

    @property
    def weight(self) -> torch.nn.Parameter:
        """The base layer's weight (for code that inspects a model's layers)."""
        return self.base.weight

    def forward(self, x: torch.Tensor, tenant_idx=None) -> torch.Tensor:
        lead = tuple(x.shape[:-1])
        batch = self.tenant_batch(tenant_idx)
        backend = _backend_for(x, self.backend)
        if backend != "triton":                  # the simple kernel or the reference
            if self.deltas[0].bands and self.deltas[0].bands[0].S.device != x.device:
                self.deltas = [cm.to(x.device) for cm in self.deltas]
            y = multi_delta_matmul(x, self.deltas, batch.rows(lead).view(lead), self.base(x),
                                   backend=backend)
        else:
            plan = batch.plan(lead, x.device)
            served = tenant_idx is None and self.tenants is not None    # inside use_tenants
            if served and self.group is not None:
                y = self.group.output(self, x, plan)
            elif served and self.overlap:
                y = serve_layers(x, [self.base], self.kernel_delta(x.device), plan,
                                 overlap=True)[0]
            else:
                y = multi_delta_matmul(x, self.kernel_delta(x.device), None, self.base(x),
                                       backend="triton", plan=plan)
        return self.extra.add(y, x, batch.rows_on(lead, x.device))

    def kernel_delta(self, device) -> KernelDelta:
        """The N deltas in the kernels' layout on `device`, prepared on first use."""
        if self._prepared is None or self._prepared.S.device != torch.device(device):
            self._prepared = prepare_multi_delta(self.deltas, device)
        return self._prepared

    def extra_repr(self) -> str:
        ranks = [sum(b.rank for b in cm.bands) for cm in self.deltas]
        return (f"tenants={len(self.deltas)}, ranks={ranks}, backend={self.backend}"
                f"{self.extra.describe()}")


# ----------------------------------------------------------------------------------------------
# Per-tenant tensors outside the projections. A full fine-tune changes its norms, biases,
# embeddings and lm_head too; each row of a batch must use its own tenant's:
#
#   norm weight / bias   per-tenant vectors gathered per row (MultiNorm): y = w_t ⊙ n(x) + b_t,
#                        n(x) computed once for the batch by the base norm itself
#   Linear bias          a per-tenant bias delta b_t − b added per row (TenantTerms)
#   lm_head              just another Linear: its compressed delta runs in the same batched
#                        kernels (MultiDeltaLinear); a tied head (one weight with the
#                        embedding) takes the tenant's embedding delta as its head delta
#   embedding            E[id] + Δ̂_t[id] at lookup (MultiDeltaEmbedding): a row of
#                        Û diag(S) V̂ᵀ is r codes of Û at id, gathered, times V̂ᵀ
#   rows stored whole    (a vocabulary's changed rows, or a tensor carried whole) deltas
#                        W_t[i] − W[i] of those rows only (RowTable): found by one sorted
#                        search at lookup, or products x·Δ[i] added to output i of a Linear
#
# embedding_delta_reference and the per-tenant reference of each term are the ground truth;
# the batched forms are plain torch, no Python loop over rows.


class RowTable(torch.nn.Module):
    """N tenants' row deltas of one weight (n_rows, cols): tenant t changes its rows index_t
    by delta_t. keys = t·n_rows + index, ascending, so one sorted search finds any tenant's
    row. row_deltas[t]: (index (K_t,) ints, delta (K_t, cols)) or None."""

    def __init__(self, n_rows: int, row_deltas: Sequence):
        super().__init__()
        present = [(t, rd) for t, rd in enumerate(row_deltas) if rd is not None]
        if not present:
            raise ValueError("RowTable needs at least one tenant's rows")
        device = present[0][1][1].device
        self.n_rows = n_rows
        self.register_buffer("keys", torch.cat([t * n_rows + rd[0].to(device, torch.int64)
                                                for t, rd in present]), persistent=False)
        self.register_buffer("delta", torch.cat([rd[1] for _, rd in present]), persistent=False)

    def lookup(self, ids: torch.Tensor, trow: torch.Tensor) -> torch.Tensor:
        """ids (n,), trow (n,) tenants -> (n, cols): row ids of tenant trow's delta (0 where
        that tenant did not change it)."""
        q = trow * self.n_rows + ids                                             # (n,)
        pos = torch.searchsorted(self.keys, q).clamp_(max=self.keys.numel() - 1)
        return self.delta[pos] * (self.keys[pos] == q).unsqueeze(1).to(self.delta.dtype)

    def add_products(self, y2: torch.Tensor, x2: torch.Tensor, trow: torch.Tensor) -> torch.Tensor:
        """y2 (B, n_rows) + x2 (B, cols) · Δ_t[i] at output i, for the rows i tenant trow[b]
        changed: one product of every stored row with every input row, masked by tenant."""
        p = x2 @ self.delta.to(x2.dtype).mT                                      # (B, K)
        mine = (self.keys // self.n_rows).unsqueeze(0) == trow.unsqueeze(1)      # (B, K)
        return y2.index_add(1, self.keys % self.n_rows, (p * mine).to(y2.dtype))


class TenantTerms(torch.nn.Module):
    """What a tenant's Linear adds beside its compressed delta: a bias delta b_t − b (N, out)
    and row deltas (a RowTable of its weight), each per row of the batch."""

    def __init__(self, n_out: int, bias_deltas: torch.Tensor | None, row_deltas, n: int):
        super().__init__()
        if bias_deltas is not None and tuple(bias_deltas.shape) != (n, n_out):
            raise ValueError(f"bias_deltas is {tuple(bias_deltas.shape)}, expected {(n, n_out)}")
        self.register_buffer("bias", bias_deltas, persistent=False)
        has_rows = row_deltas is not None and any(r is not None for r in row_deltas)
        self.rows = RowTable(n_out, row_deltas) if has_rows else None

    def add(self, y: torch.Tensor, x: torch.Tensor, trow: torch.Tensor) -> torch.Tensor:
        """y (..., out) from x (..., in), trow (B,) the tenant of each row -> y + the terms."""
        if self.bias is None and self.rows is None:
            return y
        y2 = y.reshape(-1, y.shape[-1])                                          # (B, out)
        if self.bias is not None:
            y2 = y2 + self.bias.to(y2.dtype)[trow]
        if self.rows is not None:
            y2 = self.rows.add_products(y2, x.reshape(-1, x.shape[-1]), trow)
        return y2.view(y.shape)

    def describe(self) -> str:
        return (", bias deltas" if self.bias is not None else "") + \
            (f", {self.rows.keys.numel()} stored rows" if self.rows is not None else "")


def embedding_delta_reference(ids: torch.Tensor, cm: CompressedMatrix,
                              dtype: torch.dtype) -> torch.Tensor:
    """ids (n,) -> Δ̂[ids] (n, cols) in `dtype`, Δ̂ (vocab, cols) = Û diag(S) V̂ᵀ: z = Û[ids] ⊙ S
    rounded to `dtype` (as delta_matmul_reference rounds z), then z V̂ᵀ."""
    if not cm.bands:
        return torch.zeros(ids.numel(), cm.shape[1], dtype=dtype, device=ids.device)
    V, S, U = dequantize_bands(cm, torch.float32, ids.device)     # (r, cols), (r,), (r, vocab)
    z = (U[:, ids].mT * S).to(dtype)                                          # (n, r)
    return z @ V.to(dtype)                                                    # (n, cols)


@dataclass
class EmbeddingDeltas:
    """N tenants' compressed embedding deltas (vocab, cols), laid out for row lookups on one
    device: where each tenant's vector j of Û starts in flat buffers of the stored codes,
    scales and zeros (R = the largest rank; vectors past a tenant's rank have S = 0), and
    each tenant's V̂ (r_t, cols) in the compute dtype."""
    group_size: int
    words: torch.Tensor        # int32, flat: the stored code rows of every band's Û
    scale: torch.Tensor        # fp16, flat
    zero: torch.Tensor         # fp16, flat
    word_base: torch.Tensor    # (N, R) int64: first word of vector j
    bits: torch.Tensor         # (N, R) int64: its container width c
    sz_base: torch.Tensor      # (N, R) int64: its first group's scale and zero
    S: torch.Tensor            # (N, R) fp32
    V: list                    # per tenant (r_t, cols) in the compute dtype
    ranks: list


def prepare_embedding_deltas(deltas: Sequence[CompressedMatrix | None], device,
                             dtype: torch.dtype) -> EmbeddingDeltas:
    """N compressed embedding deltas (None: that tenant has none) -> EmbeddingDeltas."""
    ranks = [sum(b.rank for b in cm.bands) if cm is not None else 0 for cm in deltas]
    n, R = len(deltas), max(1, *ranks)
    word_base, sz_base = torch.zeros(n, R, dtype=torch.int64), torch.zeros(n, R, dtype=torch.int64)
    bits, S = torch.ones(n, R, dtype=torch.int64), torch.zeros(n, R)
    words, scale, zero, V = [torch.zeros(1, dtype=torch.int32)], [], [], []
    n_words, n_groups, g = 1, 0, 128
    for t, cm in enumerate(deltas):
        j = 0
        for band in cm.bands if cm is not None else []:
            r, (w, G) = band.rank, (band.U.codes.shape[1], band.U.scale.shape[1])
            word_base[t, j:j + r] = n_words + torch.arange(r) * w
            sz_base[t, j:j + r] = n_groups + torch.arange(r) * G
            bits[t, j:j + r] = container_bits(band.bits)
            S[t, j:j + r] = band.S.float().cpu()
            words.append(band.U.codes.reshape(-1).cpu())
            scale.append(band.U.scale.reshape(-1).cpu())
            zero.append(band.U.zero.reshape(-1).cpu())
            n_words, n_groups, g, j = n_words + r * w, n_groups + r * G, band.U.group_size, j + r
        V.append(torch.cat([dequantize_vectors(b.V) for b in cm.bands]).to(device, dtype)
                 if ranks[t] else None)
    half = torch.zeros(1, dtype=torch.float16)
    return EmbeddingDeltas(g, torch.cat(words).to(device), torch.cat(scale + [half]).to(device),
                           torch.cat(zero + [half]).to(device), word_base.to(device),
                           bits.to(device), sz_base.to(device), S.to(device), V, ranks)


def embedding_delta(ids: torch.Tensor, trow: torch.Tensor, table: EmbeddingDeltas,
                    plan: TenantPlan) -> torch.Tensor:
    """ids (n,), trow (n,) the tenant of each -> Δ̂_{trow}[ids] (n, cols) in the table's
    dtype, as embedding_delta_reference: Û's codes at each id gathered from the packed
    words (all vectors of all rows at once), z = û ⊙ S, then per tenant z V̂ᵀ on its rows
    (`plan`: plan_tenants of trow, which groups them)."""
    c = table.bits[trow]                                                      # (n, R)
    pw = 32 // c
    col = ids.unsqueeze(1)                                                    # (n, 1)
    at = (table.word_base[trow] + col // pw).clamp_(max=table.words.numel() - 1)
    code = (table.words[at].to(torch.int64) >> (col % pw * c)) & ((1 << c) - 1)
    grp = (table.sz_base[trow] + col // table.group_size).clamp_(max=table.scale.numel() - 1)
    u = code * table.scale[grp].float() + table.zero[grp].float()             # (n, R)
    dtype = next((v.dtype for v in table.V if v is not None), torch.float32)
    z = (u * table.S[trow]).to(dtype)[plan.order.long()]                      # (n, R) sorted
    cols = next((v.shape[1] for v in table.V if v is not None), 0)
    out = torch.zeros(ids.numel(), cols, dtype=dtype, device=ids.device)     # sorted rows
    start = 0
    for t, count in enumerate(plan.rows_per_tenant):
        if count and table.ranks[t]:
            out[start:start + count] = z[start:start + count, :table.ranks[t]] @ table.V[t]
        start += count
    return torch.empty_like(out).index_copy_(0, plan.order.long(), out)


class MultiDeltaEmbedding(TenantModule):
    """A base nn.Embedding plus N tenants' deltas of its table: token id of a row of tenant t
    looks up E[id] + Δ̂_t[id] (its compressed delta, rebuilt per token: embedding_delta) + its
    stored rows (RowTable), summed in fp32. deltas[t]: a CompressedMatrix or None;
    row_deltas[t]: (index, delta) or None."""

    def __init__(self, base: torch.nn.Embedding, deltas: Sequence, row_deltas=None):
        super().__init__(len(deltas))
        for t, cm in enumerate(deltas):
            if cm is not None and tuple(cm.shape) != tuple(base.weight.shape):
                raise ValueError(f"embedding is {tuple(base.weight.shape)}, delta {t} is "
                                 f"{tuple(cm.shape)}")
        self.base, self.deltas = base, list(deltas)
        has_rows = row_deltas is not None and any(r is not None for r in row_deltas)
        self.rows = RowTable(base.weight.shape[0], row_deltas) if has_rows else None
        self._prepared: dict = {}

    @property
    def weight(self) -> torch.nn.Parameter:
        return self.base.weight

    def forward(self, ids: torch.Tensor, tenant_idx=None) -> torch.Tensor:
        e = self.base(ids)                                                    # (..., cols)
        lead = tuple(ids.shape)
        batch = self.tenant_batch(tenant_idx)
        trow, flat = batch.rows_on(lead, ids.device), ids.reshape(-1)
        d = torch.zeros(flat.numel(), e.shape[-1], device=e.device)          # (n, cols) fp32
        if any(cm is not None and cm.bands for cm in self.deltas):
            key = (str(ids.device), e.dtype)
            if key not in self._prepared:
                self._prepared = {key: prepare_embedding_deltas(self.deltas, ids.device, e.dtype)}
            d += embedding_delta(flat, trow, self._prepared[key], batch.plan(lead, ids.device))
        if self.rows is not None:
            d += self.rows.lookup(flat, trow)
        return (e.reshape(-1, e.shape[-1]).float() + d).to(e.dtype).view(e.shape)

    def extra_repr(self) -> str:
        ranks = [sum(b.rank for b in cm.bands) if cm is not None else 0 for cm in self.deltas]
        rows = f", {self.rows.keys.numel()} stored rows" if self.rows is not None else ""
        return f"tenants={self.n_tenants}, ranks={ranks}{rows}"


class MultiNorm(TenantModule):
    """A norm y = w ⊙ n(x) + b whose weight w and bias b are each tenant's own, gathered per
    row: n(x) is the base norm's own computation, run once for the batch by a copy of it
    with w = 1 and b = 0 (check_affine_norm checks, at patch time, that the norm has this
    form). weights (N, dim); biases (N, dim) or None (the base's bias, if any, for all)."""

    def __init__(self, base: torch.nn.Module, weights: torch.Tensor,
                 biases: torch.Tensor | None = None):
        import copy
        super().__init__(weights.shape[0])
        if isinstance(getattr(base, "bias", None), torch.Tensor) and biases is None:
            raise ValueError("the norm has a bias: give every tenant's (biases)")
        self.base = base
        self.normalize = copy.deepcopy(base)
        with torch.no_grad():
            self.normalize.weight.fill_(1)
            if biases is not None:
                self.normalize.bias.zero_()
        self.register_buffer("weights", weights, persistent=False)
        self.register_buffer("biases", biases, persistent=False)

    @property
    def weight(self) -> torch.nn.Parameter:
        return self.base.weight

    def forward(self, x: torch.Tensor, tenant_idx=None) -> torch.Tensor:
        trow = self.tenant_batch(tenant_idx).rows_on(tuple(x.shape[:-1]), x.device)
        n = self.normalize(x)                                                 # (..., dim)
        y = n.reshape(-1, n.shape[-1]) * self.weights.to(n.dtype)[trow]
        if self.biases is not None:
            y = y + self.biases.to(n.dtype)[trow]
        return y.view(n.shape)

    def extra_repr(self) -> str:
        return f"tenants={self.n_tenants}, biases={self.biases is not None}"


def check_affine_norm(module: torch.nn.Module, path: str) -> None:
    """MultiNorm serves a norm only if its output is weight ⊙ n(x) + bias with n(x) not
    depending on them: checked on a random input with random weight and bias against the
    same norm with weight 1 and bias 0 (a form like n(x) ⊙ (1 + weight) fails)."""
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 1:
        raise DeltaComeError(f"{path}: a {type(module).__name__} without a 1-D weight cannot "
                             f"take one per tenant")
    gen = torch.Generator().manual_seed(0)
    dim, has_bias = weight.shape[0], isinstance(bias, torch.Tensor)
    x, w, b = (torch.randn(*shape, generator=gen).to(weight.device)
               for shape in ((3, dim), (dim,), (dim,)))
    some = {"weight": w, **({"bias": b} if has_bias else {})}
    unit = {"weight": torch.ones_like(w), **({"bias": torch.zeros_like(b)} if has_bias else {})}
    with torch.no_grad():
        got = torch.func.functional_call(module, some, (x,))
        n = torch.func.functional_call(module, unit, (x,))
    want = n * w + (b if has_bias else 0)
    if got.shape != want.shape or not torch.allclose(got.float(), want.float(), rtol=1e-4,
                                                      atol=1e-5):
        raise DeltaComeError(f"{path}: a {type(module).__name__} whose output is not "
                             f"weight ⊙ n(x) + bias: its tenants' weights cannot be served in "
                             f"one batch")


# ----------------------------------------------------------------------------------------------
# Loading N fine-tunes onto one base model.


def patch_model_tenants(model: torch.nn.Module, delta_paths: Sequence,
                        backend: str = "auto", fuse: bool = True,
                        overlap: bool = False) -> list[str]:
    """Turn `model` (holding the BASE weights) into N fine-tunes at once, in place (tenant t
    = delta_paths[t]); call it inside `use_tenants(model, tenant_idx)`. Every compressed
    projection NAME.weight swaps the nn.Linear at NAME for a MultiDeltaLinear holding the N
    deltas. Whatever else the fine-tunes changed is served per tenant too: norms by
    MultiNorm, Linear biases and lm_head by MultiDeltaLinear (a tied lm_head takes each
    tenant's embedding delta), embeddings by MultiDeltaEmbedding; a carried tensor that all
    N files hold equal is copied into the model once. Returns NAME.weight of every replaced
    module.

    Errors, one line each (DeltaComeError), and the model is left as it was: files of
    different bases or projections, a file made for another model or resizing the
    vocabulary, a tensor that differs between tenants in a module that cannot take one per
    tenant. Every file is read and every replacement module built before the model changes.
    fuse and overlap: see serving_options."""
    paths = [Path(p) for p in delta_paths]
    if not paths:
        raise DeltaComeError("patch_model_tenants needs at least one delta file")
    files = [read_delta_file(p) for p in paths]
    check_tenant_files(paths, files)
    for p, f in zip(paths, files):
        check_model(model, f, p, grow=False)
    shared, modules = plan_tenant_modules(model, paths, files, backend)
    patch = ModelPatch(model, paths[0])
    copy_carried(patch, shared)
    patch.swaps.update(modules)
    patch.commit()
    set_serving_options(model, fuse, overlap)
    return [f"{path}.weight" for path in modules]


def check_tenant_files(paths: list, files: list) -> None:
    """Tenants of one model: the same projections compressed, one group size, one base (the
    files' base probes agree). One-line DeltaComeError naming a tensor and both files."""
    def projections(f):
        return {n for n in f.matrices if f.role(n) == "projection"}
    names, first = projections(files[0]), files[0].meta
    for p, f in zip(paths[1:], files[1:]):
        if projections(f) != names:
            odd = sorted(projections(f) ^ names)[0]
            raise DeltaComeError(f"{p} and {paths[0]} compress different matrices "
                                 f"(e.g. {odd}): not fine-tunes of one base model?")
        if f.meta["group_size"] != first["group_size"] and f.matrices:
            raise DeltaComeError(f"{p} and {paths[0]} use group sizes {f.meta['group_size']} and "
                                 f"{first['group_size']}: the kernels take one per matrix")
        probes = f.meta.get("base_probes", {})
        for name, values in first.get("base_probes", {}).items():
            if name in probes and not probes_match(values, probes[name], torch.float32):
                raise DeltaComeError(f"tensor {name}: {paths[0]} and {p} were made against "
                                     f"different base models")


def tenant_changes(name: str, files: list, w: torch.Tensor):
    """Tenant by tenant, how each file changes the model's tensor NAME (BASE's values w):
    (compressed matrix or None, (row index, row delta) or None). A carried tensor becomes
    all its rows; a row delta is FT's rows minus w's, in w's dtype."""
    out = []
    for f in files:
        rows = f.rows.get(name)
        index, values = (rows.index, rows.values) if rows is not None else \
            (torch.arange(w.shape[0]), f.carried[name]) if name in f.carried else (None, None)
        delta = None if index is None else (index, (
            values.to(w.device).float() - w.detach()[index.to(w.device)].float()).to(w.dtype))
        out.append((f.matrices.get(name), delta))
    return out


def plan_tenant_modules(model: torch.nn.Module, paths: list, files: list, backend: str):
    """The replacement of every module a tenant changes, built without changing the model:
    (carried tensors all N files hold equal, {module path: replacement module})."""
    state = model.state_dict(keep_vars=True)
    names = sorted(set().union(*(set(f.matrices) | set(f.rows) | set(f.carried) for f in files)))
    shared, mine = {}, {}
    for name in names:
        held = [f.carried.get(name) for f in files]
        if all(t is not None and same_bits(t, held[0]) for t in held):
            shared[name] = held[0]
        else:
            path, _, attr = name.rpartition(".")
            mine.setdefault(path, {})[attr] = name
    modules = {}
    for path, attrs in mine.items():
        module = model.get_submodule(path)
        if isinstance(module, (DeltaLinear, TenantModule)):
            raise DeltaComeError(f"{path} is already patched")
        weight = attrs.get("weight")
        if isinstance(module, torch.nn.Linear) and set(attrs) <= {"weight", "bias"}:
            modules[path] = tenant_linear(module, state, attrs, files, backend)
        elif isinstance(module, torch.nn.Embedding) and set(attrs) == {"weight"}:
            changes = tenant_changes(weight, files, module.weight)
            modules[path] = MultiDeltaEmbedding(module, [cm for cm, _ in changes],
                                                [rd for _, rd in changes])
            for head_path, head in model.named_modules():     # tied heads: the same weight
                if isinstance(head, torch.nn.Linear) and head.weight is module.weight \
                        and head_path not in mine:
                    modules[head_path] = tenant_linear(head, state, {"weight": weight}, files,
                                                       backend)
        elif set(attrs) <= {"weight", "bias"} and all(state[n].ndim == 1 for n in attrs.values()):
            check_affine_norm(module, path)
            modules[path] = MultiNorm(module, *(tenant_vectors(module, a, attrs.get(a), files)
                                                for a in ("weight", "bias")))
        else:
            name = next(iter(attrs.values()))
            t = next(t for t, f in enumerate(files) if name not in f.carried
                     or name not in files[0].carried
                     or not same_bits(f.carried[name], files[0].carried[name]))
            raise DeltaComeError(f"tensor {name} differs between {paths[0]} and "
                                 f"{paths[t] if t else 'BASE'}, and a {type(module).__name__} "
                                 f"cannot take one per tenant")
    return shared, modules


def tenant_vectors(module: torch.nn.Module, attr: str, name: str | None, files: list):
    """(N, dim): each tenant's copy of the module's vector `attr` (weight or bias), FT's where
    its file carries NAME, else the base's; None if the module has no such tensor."""
    base = getattr(module, attr, None)
    if not isinstance(base, torch.Tensor):
        return None
    base = base.detach()
    return torch.stack([f.carried[name].to(base) if name in f.carried else base for f in files])


def tenant_linear(layer: torch.nn.Linear, state: dict, attrs: dict, files: list,
                  backend: str) -> MultiDeltaLinear:
    """The MultiDeltaLinear serving every tenant's changes to `layer`: its compressed deltas
    (an empty one for a tenant without), row deltas, and bias deltas."""
    changes = tenant_changes(attrs["weight"], files, layer.weight) if "weight" in attrs else \
        [(None, None)] * len(files)
    empty = CompressedMatrix(tuple(layer.weight.shape), str(layer.weight.dtype), [])
    bias = None
    if "bias" in attrs:
        b = state[attrs["bias"]].detach()
        bias = torch.stack([f.carried.get(attrs["bias"], b).to(b.device).float() - b.float()
                            for f in files]).to(b.dtype)                        # (N, out)
    return MultiDeltaLinear(layer, [cm if cm is not None else empty for cm, _ in changes],
                            backend, bias, [rd for _, rd in changes])


@contextmanager
def use_tenants(model: torch.nn.Module, tenant_idx):
    """Within the block, every tenant layer of `model` (MultiDeltaLinear, MultiDeltaEmbedding,
    MultiNorm) serves sequence i of the batch with tenant tenant_idx[i] (tenant_idx: (batch,)
    ints). The plan is made once for the batch, per input shape (a generate call's prefill
    and its decoding steps have one each)."""
    layers = [m for m in model.modules() if isinstance(m, TenantModule)]
    if not layers:
        raise ValueError("the model has no tenant layers: patch_model_tenants first")
    shape = tuple(torch.as_tensor(tenant_idx).shape)
    if len(shape) != 1:
        raise ValueError(f"tenant_idx must be 1-D (one tenant per sequence), got shape "
                         f"{shape}")
    batch = TenantBatch(tenant_idx, layers[0].n_tenants)
    for m in layers:
        if m.n_tenants != batch.n_tenants:
            raise ValueError(f"layers hold {m.n_tenants} and {batch.n_tenants} tenants")
        m.tenants = batch
    try:
        yield batch
    finally:
        for m in layers:
            m.tenants = None


# ----------------------------------------------------------------------------------------------
# Serving options of a patched model (serving_options): two changes to how a forward pass
# launches the kernels, each switchable. patch_model and patch_model_tenants turn fuse on and
# leave overlap off, as measured best (docs/PERFORMANCE.md).
#
# * fuse: layers that read the same input (a block's q/k/v, and gate/up) share one fused
#   KernelDelta (prepare_fused_delta) and one launch pair. The first of them to be called
#   makes all their outputs, side by side in one buffer, and the others take theirs: a
#   Llama block's 14 delta launches become 8.
# * overlap: a layer's two launches run on a side stream of the device, and its base GEMM
#   runs on the current stream between them (run_overlapped), so phase V, which needs only
#   x, runs beside the base GEMM. At decode batch sizes phase V is latency-bound and the
#   GEMM bandwidth-bound. Every delta launch of the model goes to that one side stream, so
#   the shared workspace still sees one launch at a time.
#
# Both paths add the delta into the base output in place (launch(..., in_place=True)), and
# both can be captured in a CUDA graph: the side stream is forked from the capturing stream
# and joined back with events.

SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
_SIDE_STREAMS: dict = {}      # device -> the side stream of run_overlapped


def side_stream(device) -> "torch.cuda.Stream":
    """The one stream per CUDA device that overlapped delta launches go to."""
    key = str(torch.device(device))
    if key not in _SIDE_STREAMS:
        _SIDE_STREAMS[key] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[key]


def run_overlapped(x: torch.Tensor, make_base, run_delta) -> torch.Tensor:
    """run_delta(base) with its launches on the side stream, where `base` is a callable that
    launch calls between its two phases; it runs make_base() (the base output, allocated
    and computed on the current stream) while phase V runs, and lets phase U wait for it.
    Returns run_delta's result, ready on the current stream. On CPU tensors (the
    interpreter) the same calls run in the same order on one stream."""
    if not x.is_cuda:
        return run_delta(make_base)
    main, side = torch.cuda.current_stream(x.device), side_stream(x.device)
    side.wait_stream(main)                           # x is ready

    def base():
        with torch.cuda.stream(main):
            y = make_base()
        side.wait_stream(main)                       # phase U reads and writes y
        y.record_stream(side)
        return y

    with torch.cuda.stream(side):
        y = run_delta(base)
    main.wait_stream(side)
    x.record_stream(side)                            # x and y were made on the current stream
    return y


def linear_into(layer: torch.nn.Linear, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """x (B, in) -> out (B, out_f) = x Wᵀ (+ bias), written into `out`, whose rows may be
    strided (a column range of a wider buffer)."""
    if layer.bias is None:
        return torch.mm(x, layer.weight.mT, out=out)
    return torch.addmm(layer.bias, x, layer.weight.mT, out=out)


def serve_layers(x: torch.Tensor, bases: Sequence[torch.nn.Linear], kd: KernelDelta,
                 plan: TenantPlan, overlap: bool) -> list[torch.Tensor]:
    """x (..., in) -> [bases[m](x) + x Δ̂ₘᵀ for each member m of kd] through the kernels, in
    one launch pair: kd holds the members' deltas side by side (kd.outputs; one member:
    prepare_delta or prepare_multi_delta), rows as in `plan`. The base outputs are made in
    one (B, Σ out) buffer and the delta is added into it in place; member m's output is a
    view of its columns. overlap: the launches run on the side stream (run_overlapped)."""
    resolve_backend(x, kd.shape, None, "triton")
    if kd.S.device != x.device:
        raise ValueError(f"the prepared delta is on {kd.S.device}, x on {x.device}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, kd.shape[1]).contiguous()                            # (B, in)

    def make_base():
        if len(bases) == 1:
            return bases[0](x2)                                              # (B, out)
        y = x2.new_empty(x2.shape[0], kd.shape[0])                           # (B, Σ out)
        for layer, (out0, n) in zip(bases, kd.outputs):
            linear_into(layer, x2, y[:, out0:out0 + n])
        return y

    def run_delta(base):
        return launch(x2, kd, plan, base, None, in_place=True)
    y = run_overlapped(x2, make_base, run_delta) if overlap else run_delta(make_base())
    return [y[:, out0:out0 + n].view(*lead, n) for out0, n in kd.outputs]


class DeltaGroup:
    """Patched layers (all DeltaLinear, or all MultiDeltaLinear) that read the same input,
    served by one launch pair over their fused deltas. The first layer called with an input
    makes every layer's output; each other layer, called with the same tensor, takes its own
    (a view of one buffer). A call with any other tensor starts over. So a group assumes what
    a transformer block does: its layers are called with the same, unchanged input before
    any of them sees the next one."""

    def __init__(self, layers: Sequence[torch.nn.Module]):
        self.layers = list(layers)
        self._prepared: KernelDelta | None = None
        self._input: torch.Tensor | None = None
        self._pending: dict[int, torch.Tensor] = {}     # layer index -> output not yet taken

    def kernel_delta(self, device) -> KernelDelta:
        """The layers' deltas fused (prepare_fused_delta) on `device`, prepared on first use."""
        if self._prepared is None or self._prepared.S.device != torch.device(device):
            per_layer = [m.deltas if isinstance(m, MultiDeltaLinear) else [m.delta]
                         for m in self.layers]
            self._prepared = prepare_fused_delta([list(t) for t in zip(*per_layer)], device)
        return self._prepared

    def output(self, layer: torch.nn.Module, x: torch.Tensor,
               plan: TenantPlan | None = None) -> torch.Tensor:
        """layer's output for x. plan: the tenants' (MultiDeltaLinear); None for one tenant."""
        i = next(k for k, m in enumerate(self.layers) if m is layer)
        if self._input is x and i in self._pending:
            y = self._pending.pop(i)
            if not self._pending:
                self._input = None
            return y
        kd = self.kernel_delta(x.device)
        if plan is None:
            plan = single_plan(kd, math.prod(x.shape[:-1]), x.device)
        outs = serve_layers(x, [m.base for m in self.layers], kd, plan, layer.overlap)
        self._input = x
        self._pending = {k: y for k, y in enumerate(outs) if k != i}
        return outs[i]


def _fusable(layers: Sequence[torch.nn.Module]) -> bool:
    """Whether these patched layers can share one fused layout: two or more of one kind, one
    input size, weight dtype and device, tenant count and quantization group size."""
    if len(layers) < 2 or len({type(m) for m in layers}) > 1:
        return False
    deltas = [m.deltas if isinstance(m, MultiDeltaLinear) else [m.delta] for m in layers]
    return (len({m.base.in_features for m in layers}) == 1
            and len({(m.base.weight.dtype, m.base.weight.device) for m in layers}) == 1
            and len({len(d) for d in deltas}) == 1
            and len({b.V.group_size for d in deltas for cm in d for b in cm.bands}) <= 1)


def set_serving_options(model: torch.nn.Module, fuse: bool, overlap: bool) -> None:
    """serving_options at the end of patch_model and patch_model_tenants, where they patched
    a layer (a file of vocabulary and carried tensors alone leaves nothing to serve)."""
    if (fuse or overlap) and any(isinstance(m, (DeltaLinear, MultiDeltaLinear))
                                 for m in model.modules()):
        serving_options(model, fuse, overlap)


def serving_options(model: torch.nn.Module, fuse: bool = False, overlap: bool = False) -> int:
    """Set how the patched layers of `model` (patch_model, patch_model_tenants) launch the
    kernels on the Triton path; returns the number of fused groups. fuse: sibling layers
    named in SHARED_INPUTS (q/k/v, gate/up of one module) that read the same input share one
    launch pair; overlap: each launch pair runs on a side stream, its phase V beside the
    base GEMM (see the notes above). A call replaces the last one's setting (groups that
    stay keep their prepared layout), so serving_options(model, overlap=True) also turns off
    the fusion patch_model set up; both False is the plain path. Backends other than
    "triton" ignore both."""
    layers = [m for m in model.modules() if isinstance(m, (DeltaLinear, MultiDeltaLinear))]
    if not layers:
        raise ValueError("the model has no patched layers: patch_model or "
                         "patch_model_tenants first")
    kept = {}
    for m in layers:
        if fuse and m.group is not None:
            kept[id(m)] = m.group
        m.group, m.overlap = None, overlap
    groups = 0
    for parent in model.modules() if fuse else ():
        for names in SHARED_INPUTS:
            members = [m for m in (getattr(parent, n, None) for n in names)
                       if isinstance(m, (DeltaLinear, MultiDeltaLinear))]
            if _fusable(members):
                group = kept.get(id(members[0]))
                if group is None or group.layers != members:
                    group = DeltaGroup(members)
                for m in members:
                    m.group, m._prepared = group, None      # the group holds the layout
                groups += 1
    return groups
