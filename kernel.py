"""The delta path of a compressed fine-tune, computed from the packed codes.

For one linear layer with base weight W (out × in) and a compressed delta Δ̂ = Û diag(S) V̂ᵀ
(deltacome.py's `CompressedMatrix`: bands of singular triplets, each band's Û, V̂ at one bit
width), the fine-tune's output is

    y = x Wᵀ + ((x V̂) ⊙ S) Ûᵀ      x: (batch, in), V̂: (in, r), Û: (out, r), y: (batch, out)

The delta term is two skinny matmuls, memory-bound at decode batch sizes: the floor is the
packed bytes over HBM bandwidth. This file holds, in the order to read them:

    delta_matmul_reference  dequantize every band to the compute dtype, two torch matmuls:
                            the ground truth, readable, runs anywhere
    runtime layout          `prepare_delta`: a one-time repack of the stored codes into the
                            layout the kernels read (the file format stays as it is)
    Triton kernels          `_v_kernel`: z = (x V̂) ⊙ S over all bands in one launch;
                            `_u_kernel`: y = z Ûᵀ (+ base output) over all bands in one launch.
                            Codes are dequantized in registers, never written to memory.
    delta_matmul            checks, picks Triton (CUDA, fp16/bf16) or the reference, launches
    DeltaLinear             nn.Linear + compressed delta, forward = base + delta path
    patch_model             swaps a model's Linear layers for DeltaLinear from a delta file

  Multi-tenant serving (N fine-tunes of one base in one batch, a tenant index per row):
    multi_delta_matmul_reference   a loop over tenants of delta_matmul_reference
    plan_tenants            a batch's rows grouped by tenant, once per batch (host side)
    prepare_multi_delta     N prepared deltas concatenated, with per-tenant tables
    _multi_v_kernel, _multi_u_kernel   _v_band / _u_band over a (tenant segment, tile) grid
    multi_delta_matmul      checks, plans, picks Triton or the reference, launches
    MultiDeltaLinear        nn.Linear + N compressed deltas, forward(x, tenant_idx)
    patch_model_tenants     loads N delta files onto one base model; `use_tenants` sets the
                            tenant of each sequence for one forward pass

Usage:
    dl = DeltaLinear(base_linear, read_delta_file(path).matrices[name])
    model_names = patch_model(model, "delta.safetensors")      # serve without merging
    patch_model_tenants(model, ["math.safetensors", "code.safetensors"])  # N fine-tunes
    with use_tenants(model, torch.tensor([0, 1, 1, 0])):     # a tenant per sequence
        logits = model(input_ids).logits                      # input_ids: (4, seq)

Kernel design (why it is shaped this way; numbers are for an H100 at ~3 TB/s):

* Bytes. At 1/16 of the fp16 delta most bytes are 2-bit codes, 4 per byte; at 3 TB/s an SM
  must consume ~50 codes per clock. An int->float conversion runs at 16/clock/SM, so codes
  become floats by the exponent trick instead: OR-ing a code into the mantissa of 2^23 and
  subtracting 2^23 gives it exactly, one logic op and one add. A code is masked *in place*
  (q·2^off, off < 23 - c): no shift per code, one shift per word; the 2^-off goes into the
  other factor (x in phase V, z·scale in phase U), which is per row, not per element.
* Affine fold. Σ_j x_j (q_j s + m) = s Σ_j x_j q_j + m Σ_j x_j per group of g elements, so
  the inner loop is one add (the exponent trick) and one FMA per code and the group's
  scale/zero are applied once per group, not per element.
* Layout. Both phases are "reduce over the packed dimension, outputs contiguous": phase V
  reads V̂ as words (in/pw, r) (pw codes of consecutive `in` positions per word, vectors
  contiguous), phase U reads Û as words (r/pw, out) (pw consecutive *vectors* per word,
  outputs contiguous). A tile of 16 word rows × 128 columns per warp gives each thread all
  16 rows of its columns, so the row reductions are in-thread. (The word loads come out as
  coalesced 4-byte loads; Triton did not vectorize them to 16 bytes.) In phase V a 16-word-row block holds input position
  blk·16·pw + k·16 + t in code k of row t, so the x slice each code meets is 16 contiguous
  values (and, for batch ≥ 2, the K=16 operand of a tensor-core dot).
* Launches. Two per matrix: phase U needs all of z. Each phase splits its reduction over
  enough programs to fill the SMs; the partial sums go to a small fp32 buffer and the last
  program of each output tile (an acq_rel counter, reset by that program) adds them in a
  fixed order, scales by S or adds the base output, and writes the result: deterministic,
  no memset, no extra epilogue launch.
* Batch. Batch 1 uses CUDA-core FMAs (tensor cores would waste 15/16 of their rows and need a
  layout shuffle per code); batch 2–64 pads to 16/32/64 rows and uses tl.dot in tf32 on
  exact operands (codes ≤ 255, x in fp16/bf16 and powers of two are exact in tf32).

A prepared delta owns two small work buffers (z and the counters), so one prepared delta must
not be used by two CUDA streams at the same time.

Measured (bench.py, H100): correct at every shape and batch, 20–60× faster than the reference,
but only 5–10 % of copy bandwidth on the 70B shapes at batch 1: the kernels are bound by
instruction issue, not memory. The PTX spends ~7 instructions per 2-bit code, not ~3,
mostly reloading, converting and scaling the 16 per-row factors (x, or z·scale) for every
code, because each thread covers all 16 rows but only 4 columns. Next step: more columns
per thread, or per-row factors held in registers across codes.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import triton
import triton.language as tl

from deltacome import (CompressedMatrix, DeltaComeError, container_bits, dequantize_vectors,
                       pack_words, read_delta_file, unpack_codes)

ROWS = 16              # word rows per block in both phases: the K=16 of a tensor-core dot
MAX_BATCH = 64         # rows per launch; larger batches are cut into chunks of 64
TILE = 128             # vectors per phase-V tile: 32 threads × 4 words, one warp wide
MAX_SPLIT = 32         # programs per reduction: the last one adds this many partials
# Kernels may only read globals that are constexpr.
_ROWS = tl.constexpr(ROWS)
_MAGIC = tl.constexpr(0x4B000000)   # bit pattern of 2^23 in fp32: (q | it) as float = 2^23 + q


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
# Runtime layout. A one-time repack of one matrix's bands into the layout the kernels read:
#
#   phase V, band of rank r at c-bit containers (pw = 32/c codes per word):
#     words (nblk·16, ⌈r/4⌉·4) int32: word row blk·16+t, column i, code k = V̂ code of vector i
#     at input position blk·16·pw + k·16 + t (`in` padded with code 0 to nblk·16·pw, rows
#     padded to 16 bytes so a thread's 4 words are one aligned 16-byte load);
#     scale, zero (G, r) fp16 for G = ⌈nblk·16·pw / g⌉ groups (padding groups are 0).
#   phase U, same band:
#     words (nwr, out) int32, nwr = ⌈r/pw⌉: word row w, column o, code k = Û code of vector
#     w·pw + k at output o (vectors padded with code 0; each band starts 16-byte aligned);
#     scale, zero (Gout, P) fp16, and z (batch, P) fp32, in "block order": vector
#     i = w·pw + k with w = blk·16 + t sits at blk·16·pw + k·16 + t, so the 16 factors z·scale
#     that code k of a block meets are contiguous. P = ⌈nwr/16⌉·16·pw; padding entries are 0.
#
# All bands of a matrix are concatenated into one buffer per kind; small int32 tables tell
# each program where its band starts and how wide its codes are.


def block_order(r: int, pw: int) -> torch.Tensor:
    """Position of vector i (0..r-1) in phase U's block order (see above)."""
    i = torch.arange(r)
    w, k = i // pw, i % pw
    return (w // ROWS) * (ROWS * pw) + k * ROWS + w % ROWS


@dataclass
class KernelDelta:
    """One matrix's delta in the runtime layout, on one device, plus its work buffers."""
    shape: tuple[int, int]          # (out, in)
    group_size: int
    containers: tuple[int, ...]     # container width c of each band
    rank: int                       # Σ band ranks
    nbytes: int                     # stored bytes of the CompressedMatrix (codes, scales, σ)
    S: torch.Tensor                 # (rank,) fp32
    v_words: torch.Tensor           # int32, all bands' phase-V words, flat
    v_scale: torch.Tensor           # fp16, flat
    v_zero: torch.Tensor
    v_bands: list                   # per band [c, word base, rank, blocks, scale base, z base,
                                    #           first vector]: rows of the phase-V tile table
    u_words: torch.Tensor
    u_scale: torch.Tensor
    u_zero: torch.Tensor
    u_blocks: torch.Tensor          # (blocks, 8) int32, see _u_kernel
    z: torch.Tensor                 # (MAX_BATCH, P_total) fp32, block order, padding stays 0
    locks: torch.Tensor             # int32 counters, all 0 between launches
    _tiles: dict                    # phase-V tile tables by tile width

    @property
    def v_blocks(self) -> int:
        return max((band[3] for band in self.v_bands), default=0)

    def v_tiles(self, block_i: int) -> torch.Tensor:
        """(tiles, 8) int32: [c, word base, rank, first column, blocks, scale base, z base,
        first vector], one row per block_i vectors of a band."""
        if block_i not in self._tiles:
            rows = [[c, wb, r, col0, nblk, sb, zb, rb]
                    for c, wb, r, nblk, sb, zb, rb in self.v_bands
                    for col0 in range(0, r, block_i)]
            self._tiles[block_i] = torch.tensor(rows or [[0] * 8], dtype=torch.int32,
                                                device=self.S.device)
        return self._tiles[block_i]


def prepare_delta(cm: CompressedMatrix, device) -> KernelDelta:
    """CompressedMatrix -> KernelDelta on `device` (a one-time repack, see above)."""
    out_f, in_f = cm.shape
    device = torch.device(device)
    g = cm.bands[0].V.group_size if cm.bands else 128
    if g % 32:
        raise ValueError(f"group size {g} is not a multiple of 32")
    S, vw, vs, vz, v_bands, uw, us, uz, ub = ([] for _ in range(9))
    v_off = vs_off = u_off = us_off = rank = zpos = 0
    for band in cm.bands:
        r, c = band.rank, container_bits(band.bits)
        pw = 32 // c
        # Phase V.
        nblk = -(-in_f // (ROWS * pw))
        codes = unpack_codes(band.V.codes.to(device), band.bits, in_f)            # (r, in)
        codes = torch.nn.functional.pad(codes, (0, nblk * ROWS * pw - in_f))
        codes = codes.view(r, nblk, pw, ROWS).permute(1, 3, 0, 2)                 # blk,t,i,k
        ld = -(-r // 4) * 4                                 # rows padded to 16-byte multiples
        words = torch.nn.functional.pad(pack_words(codes, c), (0, ld - r))
        vw.append(words.reshape(-1))                                              # nblk·16·ld
        groups = -(-nblk * ROWS * pw // g)
        for src, dst in ((band.V.scale, vs), (band.V.zero, vz)):
            t = torch.zeros(groups, r, dtype=torch.float16, device=device)
            t[: src.shape[1]] = src.to(device).mT
            dst.append(t.reshape(-1))
        v_bands.append([c, v_off, r, nblk, vs_off, zpos, rank])
        v_off += nblk * ROWS * ld
        vs_off += groups * r
        # Phase U.
        nwr = -(-r // pw)
        codes = unpack_codes(band.U.codes.to(device), band.bits, out_f)           # (r, out)
        codes = torch.nn.functional.pad(codes, (0, 0, 0, nwr * pw - r))
        codes = codes.view(nwr, pw, out_f).permute(0, 2, 1)                      # w, o, k
        words = pack_words(codes, c).reshape(-1)                                  # nwr·out
        uw.append(torch.nn.functional.pad(words, (0, -words.numel() % 4)))       # 16-byte base
        ublk = -(-nwr // ROWS)
        P = ublk * ROWS * pw
        order = block_order(r, pw).to(device)
        for src, dst in ((band.U.scale, us), (band.U.zero, uz)):
            t = torch.zeros(src.shape[1], P, dtype=torch.float16, device=device)
            t[:, order] = src.to(device).mT
            dst.append(t.reshape(-1))
        ub += [[c, u_off, blk * ROWS, nwr, zpos + blk * ROWS * pw, us_off + blk * ROWS * pw,
                P, 0] for blk in range(ublk)]
        u_off += -(-nwr * out_f // 4) * 4
        us_off += band.U.scale.shape[1] * P
        S.append(band.S.to(device, torch.float32))
        rank += r
        zpos += P
    for name, size in (("phase-V words", v_off), ("phase-U words", u_off)):
        if size >= 2**31:
            raise ValueError(f"{name}: {size} words do not fit int32 offsets")

    def cat(parts, dtype):
        return torch.cat(parts) if parts else torch.zeros(0, dtype=dtype, device=device)

    n_locks = max(sum(-(-b[2] // 32) for b in v_bands), -(-out_f // 32), 1)
    vw.append(torch.zeros(TILE * 4, dtype=torch.int32, device=device))  # slack, see _v_band
    return KernelDelta(
        (out_f, in_f), g, tuple(container_bits(b.bits) for b in cm.bands), rank, cm.nbytes(),
        cat(S, torch.float32), cat(vw, torch.int32), cat(vs, torch.float16),
        cat(vz, torch.float16), v_bands, cat(uw, torch.int32), cat(us, torch.float16),
        cat(uz, torch.float16),
        torch.tensor(ub or [[0] * 8], dtype=torch.int32, device=device),
        torch.zeros(MAX_BATCH, max(zpos, 1), dtype=torch.float32, device=device),
        torch.zeros(n_locks, dtype=torch.int32, device=device), {})


# ----------------------------------------------------------------------------------------------
# Triton kernels. Both phases: a tile is 16 word rows × BLOCK columns; code k of every word is
# turned into an exact float by _code and meets a 16-long slice of the other factor.


@triton.jit
def _code(words, high, K: tl.constexpr, C: tl.constexpr):
    """Code K of each c-bit container of `words`, as exact fp32 times 2^off.

    Codes whose bits end at or below bit 23 are masked where they lie (off = c·K); the rest
    come from `high` = words >> c·⌊23/c⌋, computed once per tile. The caller multiplies the
    other factor by 2^-off (exact: a power of two)."""
    IN_PLACE: tl.constexpr = 23 // C
    OFF: tl.constexpr = C * (K % IN_PLACE)
    MASK: tl.constexpr = ((1 << C) - 1) << OFF
    if K < IN_PLACE:
        bits = words & MASK
    else:
        bits = high & MASK
    return (bits | _MAGIC).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _unscale(K: tl.constexpr, C: tl.constexpr):
    """2^-off for code K: undoes the position _code leaves it at (exact: a power of two)."""
    return 1.0 / (1 << (C * (K % (23 // C))))


@triton.jit
def _v_band(acc, x_ptr, stride_xb, n_batch, n_in, words_ptr, scale_ptr, zero_ptr,
            w_base, s_base, n_cols, col0, blk_lo, blk_hi,
            C: tl.constexpr, FOLD: tl.constexpr, GROUP: tl.constexpr,
            BLOCK_B: tl.constexpr, BLOCK_I: tl.constexpr):
    """acc (BLOCK_B, BLOCK_I) += x[:, blocks blk_lo..blk_hi) · V̂ᵀ for one tile of one band.

    Per group: part = Σ x·q (FMAs at batch 1, a tf32 dot otherwise), then
    acc += scale · part + zero · Σ x, the affine fold."""
    PW: tl.constexpr = 32 // C
    t = tl.arange(0, _ROWS)
    b = tl.arange(0, BLOCK_B)
    cols = col0 + tl.arange(0, BLOCK_I)
    cmask = cols < n_cols
    ld = tl.multiple_of((n_cols + 3) // 4 * 4, 4)       # word rows padded to 16 bytes
    w_base = tl.multiple_of(w_base, 4)
    for blk in range(blk_lo, blk_hi):
        rows = blk * _ROWS + t
        # No mask (it would stop 16-byte loads): columns past the band's rank read the next
        # row or the buffer's slack; their results are never stored.
        words = tl.load(words_ptr + w_base + rows[:, None] * ld + cols[None, :])  # (16, BLOCK_I)
        high = words >> (C * (23 // C))
        for k in tl.static_range(PW):
            j = blk * (_ROWS * PW) + k * _ROWS + t                           # input positions
            f = _code(words, high, k, C)                                     # (16, BLOCK_I)
            if k % FOLD == 0:                                                # a group starts
                if BLOCK_B == 1:
                    part = tl.zeros((_ROWS, BLOCK_I), tl.float32)
                    xsum = tl.zeros((_ROWS,), tl.float32)
                else:
                    part = tl.zeros((BLOCK_B, BLOCK_I), tl.float32)
                    xsum = tl.zeros((BLOCK_B,), tl.float32)
            if BLOCK_B == 1:     # 1-D, so it is loaded straight into the tile's row layout
                xk = tl.load(x_ptr + j, mask=j < n_in, other=0.0).to(tl.float32)   # (16,)
                part += (xk * _unscale(k, C))[:, None] * f                   # rows in-thread
                xsum += xk
            else:
                xk = tl.load(x_ptr + b[:, None] * stride_xb + j[None, :],
                             mask=(b[:, None] < n_batch) & (j[None, :] < n_in),
                             other=0.0).to(tl.float32)                       # (BLOCK_B, 16)
                part = tl.dot(xk * _unscale(k, C), f, part, input_precision="tf32")
                xsum += tl.sum(xk, 1)
            if k % FOLD == FOLD - 1:                                         # the group ends
                grp = (blk * (_ROWS * PW) + k * _ROWS) // GROUP
                s = tl.load(scale_ptr + s_base + grp * n_cols + cols, mask=cmask,
                            other=0.0).to(tl.float32)
                m = tl.load(zero_ptr + s_base + grp * n_cols + cols, mask=cmask,
                            other=0.0).to(tl.float32)
                if BLOCK_B == 1:
                    acc += (tl.sum(part, 0) * s + tl.sum(xsum, 0) * m)[None, :]
                else:
                    acc += part * s[None, :] + xsum[:, None] * m[None, :]
    return acc


@triton.jit
def _v_bands(acc, x_ptr, stride_xb, n_batch, n_in, words_ptr, scale_ptr, zero_ptr, c, w_base,
             s_base, n_cols, col0, blk_lo, blk_hi, GROUP: tl.constexpr, BLOCK_B: tl.constexpr,
             BLOCK_I: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, C4: tl.constexpr,
             C8: tl.constexpr, F1: tl.constexpr, F2: tl.constexpr, F4: tl.constexpr,
             F8: tl.constexpr):
    """_v_band at the tile's container width c. The width must be a compile-time constant
    inside _v_band (its unrolled code loop), hence one branch per width; C1..C8 leave out
    the widths a launch does not have."""
    if C1:
        if c == 1:
            acc = _v_band(acc, x_ptr, stride_xb, n_batch, n_in, words_ptr, scale_ptr, zero_ptr,
                          w_base, s_base, n_cols, col0, blk_lo, blk_hi,
                          1, F1, GROUP, BLOCK_B, BLOCK_I)
    if C2:
        if c == 2:
            acc = _v_band(acc, x_ptr, stride_xb, n_batch, n_in, words_ptr, scale_ptr, zero_ptr,
                          w_base, s_base, n_cols, col0, blk_lo, blk_hi,
                          2, F2, GROUP, BLOCK_B, BLOCK_I)
    if C4:
        if c == 4:
            acc = _v_band(acc, x_ptr, stride_xb, n_batch, n_in, words_ptr, scale_ptr, zero_ptr,
                          w_base, s_base, n_cols, col0, blk_lo, blk_hi,
                          4, F4, GROUP, BLOCK_B, BLOCK_I)
    if C8:
        if c == 8:
            acc = _v_band(acc, x_ptr, stride_xb, n_batch, n_in, words_ptr, scale_ptr, zero_ptr,
                          w_base, s_base, n_cols, col0, blk_lo, blk_hi,
                          8, F8, GROUP, BLOCK_B, BLOCK_I)
    return acc


@triton.jit
def _v_kernel(x_ptr, stride_xb, n_batch, n_in, words_ptr, scale_ptr, zero_ptr, S_ptr, tiles_ptr,
              zpart_ptr, z_ptr, stride_z, locks_ptr, rank, n_split,
              GROUP: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_I: tl.constexpr,
              SPLIT: tl.constexpr, MAX_SPLIT: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr,
              C4: tl.constexpr, C8: tl.constexpr, F1: tl.constexpr, F2: tl.constexpr,
              F4: tl.constexpr, F8: tl.constexpr):
    """Phase V: z = (x V̂) ⊙ S for all bands, written to z in phase U's block order.

    Grid (tiles, n_split); the tile table is KernelDelta.v_tiles. Program (tile, s) reduces
    blocks [s·⌈nblk/n_split⌉, ...) of its band; SPLIT = n_split > 1. C1..C8 say which
    container widths occur (absent ones are not compiled); F1..F8 are how many consecutive
    codes of a block surely share one quantization group, per width."""
    tile = tl.program_id(0)
    split = tl.program_id(1)
    meta = tiles_ptr + tile * 8
    c = tl.load(meta)
    w_base = tl.load(meta + 1)
    n_cols = tl.load(meta + 2)
    col0 = tl.multiple_of(tl.load(meta + 3), BLOCK_I)     # tiles start at multiples of it
    nblk = tl.load(meta + 4)
    s_base = tl.load(meta + 5)
    z_base = tl.load(meta + 6)
    r_base = tl.load(meta + 7)
    per = tl.cdiv(nblk, n_split)
    blk_lo = split * per
    blk_hi = tl.minimum(blk_lo + per, nblk)
    acc = tl.zeros((BLOCK_B, BLOCK_I), tl.float32)
    acc = _v_bands(acc, x_ptr, stride_xb, n_batch, n_in, words_ptr, scale_ptr, zero_ptr, c,
                   w_base, s_base, n_cols, col0, blk_lo, blk_hi, GROUP, BLOCK_B, BLOCK_I,
                   C1, C2, C4, C8, F1, F2, F4, F8)

    b = tl.arange(0, BLOCK_B)
    i = col0 + tl.arange(0, BLOCK_I)                                         # band columns
    mask = (b[:, None] < n_batch) & (i[None, :] < n_cols)
    pw = 32 // c
    w = i // pw
    dst = z_ptr + b[:, None] * stride_z + z_base + (w // _ROWS) * (_ROWS * pw) \
        + (i % pw) * _ROWS + w % _ROWS                                       # block order
    S = tl.load(S_ptr + r_base + i, mask=i < n_cols, other=0.0)
    if not SPLIT:
        tl.store(dst, acc * S[None, :], mask=mask)
    else:
        part = zpart_ptr + (split * n_batch + b[:, None]) * rank + r_base + i[None, :]
        tl.store(part, acc, mask=mask)
        tl.debug_barrier()                    # every thread's partial is written ...
        count = tl.atomic_add(locks_ptr + tile, 1, sem="acq_rel")   # ... before the release
        if count == n_split - 1:              # the last program of this tile sums them
            total = tl.zeros((BLOCK_B, BLOCK_I), tl.float32)
            for s in tl.static_range(MAX_SPLIT):      # unrolled: all loads in flight at once
                live = mask & (b[:, None] * 0 + s < n_split)
                total += tl.load(zpart_ptr + (s * n_batch + b[:, None]) * rank + r_base
                                 + i[None, :], mask=live, other=0.0, cache_modifier=".cg")
            tl.store(dst, total * S[None, :], mask=mask)
            tl.atomic_xchg(locks_ptr + tile, 0)


@triton.jit
def _u_band(acc, cz, z_ptr, stride_z, n_batch, n_out, words_ptr, scale_ptr, zero_ptr,
            w_base, row0, n_rows, z_off, s_off, o, omask,
            C: tl.constexpr, BLOCK_B: tl.constexpr):
    """One 16-word-row block of one band: acc += (z·scale) · codes, cz += z · zero."""
    PW: tl.constexpr = 32 // C
    t = tl.arange(0, _ROWS)
    b = tl.arange(0, BLOCK_B)
    bmask = b[:, None] < n_batch
    rows = row0 + t
    w_base = tl.multiple_of(w_base, 4)
    words = tl.load(words_ptr + w_base + rows[:, None] * n_out + o[None, :],
                    mask=(rows[:, None] < n_rows) & omask[None, :], other=0)   # (16, BLOCK_O)
    high = words >> (C * (23 // C))
    q = tl.arange(0, _ROWS * PW)                                             # the whole block
    zb = tl.load(z_ptr + b[:, None] * stride_z + z_off + q[None, :], mask=bmask, other=0.0)
    cz += tl.sum(zb * tl.load(zero_ptr + s_off + q).to(tl.float32)[None, :], 1)
    for k in tl.static_range(PW):
        f = _code(words, high, k, C)                                         # (16, BLOCK_O)
        s = tl.load(scale_ptr + s_off + k * _ROWS + t).to(tl.float32) * _unscale(k, C)
        if BLOCK_B == 1:     # 1-D, so it is loaded straight into the tile's row layout
            zk = tl.load(z_ptr + z_off + k * _ROWS + t)                      # (16,)
            acc += (zk * s)[:, None] * f                                     # rows in-thread
        else:
            zk = tl.load(z_ptr + b[:, None] * stride_z + z_off + k * _ROWS + t[None, :],
                         mask=bmask, other=0.0)                              # (BLOCK_B, 16)
            acc = tl.dot(zk * s[None, :], f, acc, input_precision="tf32")
    return acc, cz


@triton.jit
def _u_tile(z_ptr, stride_z, n_batch, n_out, words_ptr, scale_ptr, zero_ptr, blocks_ptr,
            e_lo, e_hi, grp, o, omask, BLOCK_B: tl.constexpr, BLOCK_O: tl.constexpr,
            C1: tl.constexpr, C2: tl.constexpr, C4: tl.constexpr, C8: tl.constexpr):
    """One output tile's y = z Ûᵀ (BLOCK_B, BLOCK_O) fp32, summed over the 16-row blocks
    e_lo..e_hi of the block table. _u_band needs its container width as a compile-time
    constant, hence one branch per width; C1..C8 leave out the widths a launch lacks."""
    if BLOCK_B == 1:
        acc = tl.zeros((_ROWS, BLOCK_O), tl.float32)
    else:
        acc = tl.zeros((BLOCK_B, BLOCK_O), tl.float32)
    cz = tl.zeros((BLOCK_B,), tl.float32)
    for e in range(e_lo, e_hi):
        meta = blocks_ptr + e * 8
        c = tl.load(meta)
        w_base = tl.load(meta + 1)
        row0 = tl.load(meta + 2)
        n_rows = tl.load(meta + 3)
        z_off = tl.load(meta + 4)
        s_off = tl.load(meta + 5) + grp * tl.load(meta + 6)
        if C1:
            if c == 1:
                acc, cz = _u_band(acc, cz, z_ptr, stride_z, n_batch, n_out, words_ptr,
                                  scale_ptr, zero_ptr, w_base, row0, n_rows, z_off, s_off,
                                  o, omask, 1, BLOCK_B)
        if C2:
            if c == 2:
                acc, cz = _u_band(acc, cz, z_ptr, stride_z, n_batch, n_out, words_ptr,
                                  scale_ptr, zero_ptr, w_base, row0, n_rows, z_off, s_off,
                                  o, omask, 2, BLOCK_B)
        if C4:
            if c == 4:
                acc, cz = _u_band(acc, cz, z_ptr, stride_z, n_batch, n_out, words_ptr,
                                  scale_ptr, zero_ptr, w_base, row0, n_rows, z_off, s_off,
                                  o, omask, 4, BLOCK_B)
        if C8:
            if c == 8:
                acc, cz = _u_band(acc, cz, z_ptr, stride_z, n_batch, n_out, words_ptr,
                                  scale_ptr, zero_ptr, w_base, row0, n_rows, z_off, s_off,
                                  o, omask, 8, BLOCK_B)
    if BLOCK_B == 1:
        y = tl.sum(acc, 0)[None, :] + cz[:, None]                            # (1, BLOCK_O)
    else:
        y = acc + cz[:, None]                                                # (BLOCK_B, BLOCK_O)
    return y


@triton.jit
def _u_kernel(z_ptr, stride_z, n_batch, n_out, words_ptr, scale_ptr, zero_ptr, blocks_ptr,
              n_blocks, ypart_ptr, y_ptr, stride_y, base_ptr, stride_base, locks_ptr, n_split,
              HAS_BASE: tl.constexpr, GROUP: tl.constexpr, BLOCK_B: tl.constexpr,
              BLOCK_O: tl.constexpr, SPLIT: tl.constexpr, MAX_SPLIT: tl.constexpr,
              C1: tl.constexpr, C2: tl.constexpr, C4: tl.constexpr, C8: tl.constexpr):
    """Phase U: y = z Ûᵀ (+ base) for all bands; z in block order, already scaled by S.

    Grid (⌈out/BLOCK_O⌉, n_split); SPLIT = n_split > 1. BLOCK_O divides the group size, so
    within a tile every vector has one scale and one zero. Program (tile, s) reduces its
    share of the 16-row blocks of all bands, listed in the table as [container bits, word
    base, first word row, band word rows, z offset, scale offset in group 0, scale stride
    per group, unused]."""
    tile = tl.program_id(0)
    split = tl.program_id(1)
    o = tile * BLOCK_O + tl.arange(0, BLOCK_O)
    omask = o < n_out
    grp = tile * BLOCK_O // GROUP
    per = tl.cdiv(n_blocks, n_split)
    y = _u_tile(z_ptr, stride_z, n_batch, n_out, words_ptr, scale_ptr, zero_ptr, blocks_ptr,
                split * per, tl.minimum(split * per + per, n_blocks), grp, o, omask,
                BLOCK_B, BLOCK_O, C1, C2, C4, C8)                           # (BLOCK_B, BLOCK_O)

    b = tl.arange(0, BLOCK_B)
    mask = (b[:, None] < n_batch) & omask[None, :]
    dst = y_ptr + b[:, None] * stride_y + o[None, :]
    base = base_ptr + b[:, None] * stride_base + o[None, :]
    if not SPLIT:
        if HAS_BASE:
            y += tl.load(base, mask=mask, other=0.0).to(tl.float32)
        tl.store(dst, y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(ypart_ptr + (split * n_batch + b[:, None]) * n_out + o[None, :], y, mask=mask)
        tl.debug_barrier()
        count = tl.atomic_add(locks_ptr + tile, 1, sem="acq_rel")
        if count == n_split - 1:
            total = tl.zeros((BLOCK_B, BLOCK_O), tl.float32)
            for s in tl.static_range(MAX_SPLIT):      # unrolled: all loads in flight at once
                live = mask & (b[:, None] * 0 + s < n_split)
                total += tl.load(ypart_ptr + (s * n_batch + b[:, None]) * n_out + o[None, :],
                                 mask=live, other=0.0, cache_modifier=".cg")
            if HAS_BASE:
                total += tl.load(base, mask=mask, other=0.0).to(tl.float32)
            tl.store(dst, total.to(y_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(locks_ptr + tile, 0)


# ----------------------------------------------------------------------------------------------
# Launch configuration and the wrappers.


@dataclass
class KernelConfig:
    """Tiling of one launch pair; `choose_config` picks one per shape and batch."""
    split_v: int           # programs sharing one phase-V tile's reduction over `in`
    split_u: int           # programs sharing one phase-U tile's reduction over the rank
    warps_v: int = 1       # batch 1: the phase-V tile is 128·warps_v vectors wide
    block_o: int = 128     # phase-U tile width, divides the group size
    waves: int = 4         # only for the record: the program count choose_config aimed at


def choose_config(kd: KernelDelta, batch: int, sm_count: int, waves: int = 4,
                  warps_v: int = 1) -> KernelConfig:
    """Split each reduction until there are ~`waves` programs per SM (small CTAs: 1 warp at
    batch 1), and no further than one 16-row block per program."""
    block_o = math.gcd(kd.group_size, 128)
    block_i = TILE * warps_v if batch == 1 else TILE
    v_tiles = kd.v_tiles(block_i).shape[0]
    u_tiles = -(-kd.shape[0] // block_o)
    target = waves * sm_count
    split_v = max(1, min(kd.v_blocks, -(-target // v_tiles), MAX_SPLIT))
    split_u = max(1, min(kd.u_blocks.shape[0], -(-target // u_tiles), MAX_SPLIT))
    return KernelConfig(split_v, split_u, warps_v, block_o, waves)


def fold_size(group_size: int, c: int) -> int:
    """How many consecutive codes of a phase-V block surely lie in one quantization group:
    a block is 16·pw positions starting at a multiple of 16·pw, groups start at multiples
    of g, so runs of gcd(g, 16·pw) positions aligned to that never cross a group edge."""
    return math.gcd(group_size, ROWS * (32 // c)) // ROWS


def width_args(containers, group_size: int) -> tuple[dict, dict]:
    """The kernels' per-width constexprs: C1..C8, which container widths occur (the others
    are not compiled), and F1..F8, fold_size of each width."""
    widths = (1, 2, 4, 8)
    return ({f"C{c}": c in containers for c in widths},
            {f"F{c}": fold_size(group_size, c) for c in widths})


def delta_matmul_triton(x: torch.Tensor, kd: KernelDelta, base: torch.Tensor | None = None,
                        config: KernelConfig | None = None) -> torch.Tensor:
    """x (B, in) fp16/bf16, B ≤ 64, contiguous -> x Δ̂ᵀ (+ base) (B, out) in x.dtype."""
    B, in_f = x.shape
    out_f = kd.shape[0]
    y = torch.empty(B, out_f, dtype=x.dtype, device=x.device)
    if kd.rank == 0:
        return y.copy_(base) if base is not None else y.zero_()
    if config is None:
        sm = torch.cuda.get_device_properties(x.device).multi_processor_count \
            if x.is_cuda else 4
        config = choose_config(kd, B, sm)
    if kd.group_size % config.block_o:
        raise ValueError(f"block_o={config.block_o} must divide the group size {kd.group_size}")
    block_b = 1 if B == 1 else max(16, triton.next_power_of_2(B))
    block_i = TILE * config.warps_v if B == 1 else TILE
    tiles = kd.v_tiles(block_i)
    u_tiles = -(-out_f // config.block_o)
    if max(tiles.shape[0], u_tiles) > kd.locks.numel():
        raise ValueError(f"{max(tiles.shape[0], u_tiles)} tiles but {kd.locks.numel()} "
                         f"counters: use block_o ≥ 32")
    flags, folds = width_args(kd.containers, kd.group_size)
    zpart = torch.empty(config.split_v if config.split_v > 1 else 0, B, kd.rank,
                        dtype=torch.float32, device=x.device)
    ypart = torch.empty(config.split_u if config.split_u > 1 else 0, B, out_f,
                        dtype=torch.float32, device=x.device)
    _v_kernel[(tiles.shape[0], config.split_v)](
        x, x.stride(0), B, in_f, kd.v_words, kd.v_scale, kd.v_zero, kd.S, tiles,
        zpart, kd.z, kd.z.stride(0), kd.locks, kd.rank, config.split_v,
        GROUP=kd.group_size, BLOCK_B=block_b, BLOCK_I=block_i, SPLIT=config.split_v > 1,
        MAX_SPLIT=triton.next_power_of_2(config.split_v),
        **flags, **folds,
        num_warps=config.warps_v if B == 1 else 4)
    base_arg = base if base is not None else y
    _u_kernel[(u_tiles, config.split_u)](
        kd.z, kd.z.stride(0), B, out_f, kd.u_words, kd.u_scale, kd.u_zero, kd.u_blocks,
        kd.u_blocks.shape[0], ypart, y, y.stride(0), base_arg, base_arg.stride(0), kd.locks,
        config.split_u, HAS_BASE=base is not None, GROUP=kd.group_size, BLOCK_B=block_b,
        BLOCK_O=config.block_o, SPLIT=config.split_u > 1,
        MAX_SPLIT=triton.next_power_of_2(config.split_u),
        **flags,
        num_warps=max(1, config.block_o // 128) if B == 1 else 4)
    return y


def resolve_backend(x: torch.Tensor, shape: tuple[int, int], base: torch.Tensor | None,
                    backend: str) -> str:
    """The checks both wrappers share: x (..., in) and base (..., out) against the delta's
    (out, in) shape, then "auto" -> "triton" (fp16/bf16 CUDA tensors) or "reference", and
    for Triton, x's dtype and device. Returns "triton" or "reference"."""
    if backend not in ("auto", "triton", "reference"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'reference', got {backend!r}")
    out_f, in_f = shape
    if x.ndim == 0 or x.shape[-1] != in_f:
        raise ValueError(f"x has shape {tuple(x.shape)}; the delta expects (..., {in_f})")
    if base is not None and (base.shape != (*x.shape[:-1], out_f) or base.device != x.device):
        raise ValueError(f"base has shape {tuple(base.shape)} on {base.device}; expected "
                         f"{(*x.shape[:-1], out_f)} on {x.device}")
    if backend == "auto":
        backend = "triton" if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) \
            else "reference"
    if backend == "triton":
        if x.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"the Triton kernels take fp16 or bf16 x, got {x.dtype}")
        if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set "
                             "before triton is imported)")
    return backend


def delta_matmul(x: torch.Tensor, delta: CompressedMatrix | KernelDelta,
                 base: torch.Tensor | None = None, backend: str = "auto",
                 config: KernelConfig | None = None) -> torch.Tensor:
    """x (..., in) -> x Δ̂ᵀ (..., out), plus `base` (..., out) if given, in x.dtype.

    backend: "auto" = Triton for fp16/bf16 CUDA tensors, the reference otherwise;
    "triton" = the kernels (also on CPU tensors under TRITON_INTERPRET=1); "reference".
    A CompressedMatrix is repacked on every Triton call: prepare it once with
    `prepare_delta` (DeltaLinear does) to serve it."""
    out_f, in_f = delta.shape
    if resolve_backend(x, delta.shape, base, backend) == "reference":
        if isinstance(delta, KernelDelta):
            raise ValueError("the reference backend needs the CompressedMatrix, "
                             "not a KernelDelta")
        y = delta_matmul_reference(x, delta)
        return y if base is None else base + y
    kd = delta if isinstance(delta, KernelDelta) else prepare_delta(delta, x.device)
    if kd.S.device != x.device:
        raise ValueError(f"the prepared delta is on {kd.S.device}, x on {x.device}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_f).contiguous()                                   # (B, in)
    b2 = None if base is None else base.reshape(-1, out_f).contiguous()
    chunks = [delta_matmul_triton(x2[i:i + MAX_BATCH], kd,
                                  None if b2 is None else b2[i:i + MAX_BATCH], config)
              for i in range(0, x2.shape[0], MAX_BATCH)]
    y = torch.cat(chunks) if len(chunks) != 1 else chunks[0]
    return y.reshape(*lead, out_f) if x2.shape[0] else x.new_zeros(*lead, out_f)


# ----------------------------------------------------------------------------------------------
# Serving a compressed fine-tune: one layer, then a whole model.


class DeltaLinear(torch.nn.Module):
    """A base nn.Linear plus one matrix's compressed delta: forward(x) = base(x) + x Δ̂ᵀ.

    The delta is prepared for the kernels on first use on a CUDA device (a one-time repack);
    the base layer's parameters are shared, not copied."""

    def __init__(self, base: torch.nn.Linear, delta: CompressedMatrix, backend: str = "auto"):
        super().__init__()
        if tuple(base.weight.shape) != tuple(delta.shape):
            raise ValueError(f"base weight is {tuple(base.weight.shape)}, delta is "
                             f"{tuple(delta.shape)}")
        self.base, self.delta, self.backend = base, delta, backend
        self._prepared: KernelDelta | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        use_triton = self.backend == "triton" or (
            self.backend == "auto" and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16))
        if not use_triton:
            if self.delta.bands and self.delta.bands[0].S.device != x.device:
                self.delta = self.delta.to(x.device)
            return delta_matmul(x, self.delta, y, backend="reference")
        if self._prepared is None or self._prepared.S.device != x.device:
            self._prepared = prepare_delta(self.delta, x.device)
        return delta_matmul(x, self._prepared, y, backend="triton")

    def extra_repr(self) -> str:
        bands = ",".join(f"{b.bits}:{b.rank}" for b in self.delta.bands) or "empty"
        return f"bands={bands}, backend={self.backend}"


def patch_model(model: torch.nn.Module, delta_path, backend: str = "auto") -> list[str]:
    """Turn `model` (holding the BASE weights) into the fine-tune in place: every compressed
    matrix NAME.weight swaps the nn.Linear at NAME for a DeltaLinear, and every carried
    tensor is copied into the parameter or buffer of that name. Returns the patched names.
    Names are the checkpoint's (e.g. model.layers.0.self_attn.q_proj.weight)."""
    delta = read_delta_file(delta_path)
    copy_carried(model, delta.carried, delta_path)
    for name, cm in delta.matrices.items():
        replace_linear(model, name, lambda layer: DeltaLinear(layer, cm, backend), delta_path)
    return list(delta.matrices)


def copy_carried(model: torch.nn.Module, carried: dict, source) -> None:
    """Copy a delta file's carried tensors (FT's norms, embeddings, ...) into the model's
    parameters or buffers of the same names; `source` names the file in errors."""
    state = model.state_dict(keep_vars=True)
    for name, tensor in carried.items():
        if name not in state:
            raise DeltaComeError(f"{source}: carried tensor {name} is not in the model")
        if state[name].shape != tensor.shape:
            raise DeltaComeError(f"carried tensor {name}: {tuple(tensor.shape)} in the delta "
                                 f"file, {tuple(state[name].shape)} in the model")
        with torch.no_grad():
            state[name].copy_(tensor)


def replace_linear(model: torch.nn.Module, name: str, make, source) -> None:
    """Swap the nn.Linear that holds matrix `name` (NAME.weight) for make(that Linear)."""
    if not name.endswith(".weight"):
        raise DeltaComeError(f"{source}: matrix {name} is not a '.weight' tensor")
    path = name.removesuffix(".weight")
    try:
        layer = model.get_submodule(path)
    except AttributeError:
        raise DeltaComeError(f"{source}: the model has no module {path} (for {name})")
    if isinstance(layer, (DeltaLinear, MultiDeltaLinear)):
        raise DeltaComeError(f"{path} is already patched")
    if not isinstance(layer, torch.nn.Linear):
        raise DeltaComeError(f"{path} is a {type(layer).__name__}, not an nn.Linear")
    parent_name, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, make(layer))


# ----------------------------------------------------------------------------------------------
# Multi-tenant serving: one base, N compressed fine-tunes of it, one batch. Row b of a batch
# belongs to tenant t = tenant_idx[b]:
#
#     y[b] = x[b] Wᵀ + ((x[b] V̂ₜ) ⊙ Sₜ) Ûₜᵀ
#
# The base GEMM runs once for the whole batch; the delta paths of all tenants run in one
# launch pair per matrix (or one per row-padding bucket present, see the plan), reusing
# _v_band / _u_band, and each tenant's packed bytes are read once per batch however many of
# its rows the batch holds (once per MAX_BATCH = 64 rows beyond that).
#
# * Plan. Rows are sorted by tenant (stable) and cut into segments of one tenant and ≤ 64
#   rows. A 1-row segment takes the batch-1 FMA path, longer ones the tl.dot path padded to
#   16/32/64 rows; one launch pair per padding present, so 64 tenants × 1 token is one pair
#   and never pays for 64-row tensor-core tiles. The plan needs the indices on the host: a
#   serving loop has them there; a CUDA index costs one sync, once per batch (use_tenants
#   makes one plan per batch for every layer).
# * Grid (segment, tile, split). Tile tables are per tenant, padded to the largest tenant's
#   tile count with empty tiles (rank 0: no code loaded, nothing stored), so only the plan's
#   segment table (tenant, first row, rows) changes per batch: no per-call table, no sync,
#   capturable in a CUDA graph.
# * Layout. The tenants' prepared buffers (codes, scales, zeros, S) are concatenated, their
#   tables' word and scale offsets shifted into the concatenation. z has one row per batch
#   row, in that row's tenant's block order. It is zeroed per call (one memset of B × P × 4
#   bytes): phase U reads the padding entries of z's 16-row blocks (times a zero scale), and
#   the padding of one tenant is a real entry of another, so a stale non-finite value from an
#   earlier batch must not survive there.
# * Rows not sorted by tenant are gathered into sorted order before phase V (one
#   index_select, skipped when already sorted); phase U writes each output row back to its
#   original position through the plan's order table and reads the fused base output the
#   same way.
# * Splits as choose_config: a tile's reduction is split until there are ~4 programs per SM;
#   with 64 tenants the (segment, tile) grid alone fills an H100 (split 1).
#
# Tenants of one model share every tensor outside the compressed matrices (norms,
# embeddings, lm_head): patch_model_tenants refuses files whose carried tensors differ.
# Like a KernelDelta, a MultiKernelDelta owns its split counters: one stream at a time.


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
                                 tenant_idx) -> torch.Tensor:
    """x (..., in), tenant_idx (...) -> (..., out), row b = delta_{tenant_idx[b]}(x[b]),
    each tenant's rows through delta_matmul_reference in x.dtype."""
    out_f, in_f = deltas[0].shape
    idx = check_tenant_idx(tenant_idx, x.shape[:-1], len(deltas)).reshape(-1)
    x2 = x.reshape(-1, in_f)                                                  # (B, in)
    y = x2.new_zeros(x2.shape[0], out_f)                                      # (B, out)
    for t in idx.unique().tolist():
        rows = (idx == t).nonzero().squeeze(1).to(x.device)
        y[rows] = delta_matmul_reference(x2[rows], deltas[t])
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
            block_b = 1 if rows == 1 else max(16, triton.next_power_of_2(rows))
            buckets.setdefault(block_b, []).append([t, s, rows])
        start += n
    groups = [(bb, torch.tensor(segs, dtype=torch.int32, device=device), len(segs))
              for bb, segs in sorted(buckets.items())]
    return TenantPlan(idx.numel(), n_tenants, tuple(counts),
                      order.to(device, torch.int32),
                      bool(torch.equal(order, torch.arange(idx.numel()))), groups)


# ----------------------------------------------------------------------------------------------
# Multi-tenant runtime layout: N prepared deltas in one buffer per kind.

V_COLS = 10            # columns of the phase-V tile table, see prepare_multi_delta
U_COLS = 8             # columns of the phase-U block table (_u_kernel's layout)


@dataclass
class MultiKernelDelta:
    """N deltas of one matrix shape in the runtime layout above, concatenated, on one device.

    v_tiles (N·max_tiles, 10) int32, tenant t's tile j at row t·max_tiles + j:
      [c, word base, band rank, first column, blocks, scale base, z base, first vector of the
       band in its tenant, the same in the concatenated S, unused]; padding rows are all 0.
    u_blocks (Σ blocks, 8) int32: _u_kernel's block table, word and scale offsets shifted;
    u_range (N, 2) int32: [first row in u_blocks, rows] per tenant."""
    shape: tuple[int, int]          # (out, in)
    group_size: int
    containers: tuple[int, ...]     # container widths present in any tenant
    ranks: tuple[int, ...]          # Σ band ranks, per tenant
    nbytes: tuple[int, ...]         # stored bytes of each CompressedMatrix
    device_bytes: tuple[int, ...]   # bytes of each tenant's share of the buffers below
    S: torch.Tensor                 # fp32, flat
    v_words: torch.Tensor           # int32, flat
    v_scale: torch.Tensor           # fp16, flat
    v_zero: torch.Tensor
    v_tiles: torch.Tensor
    max_tiles: int
    max_blocks: int                 # most 16-row blocks of any phase-V band
    u_words: torch.Tensor
    u_scale: torch.Tensor
    u_zero: torch.Tensor
    u_blocks: torch.Tensor
    u_range: torch.Tensor
    max_u_blocks: int
    z_width: int                    # P of the widest tenant: z is (B, z_width) fp32
    max_rank: int
    locks: torch.Tensor             # int32 counters, all 0 between launches

    @property
    def n_tenants(self) -> int:
        return len(self.ranks)


def prepare_multi_delta(deltas: Sequence[CompressedMatrix], device) -> MultiKernelDelta:
    """N CompressedMatrix of one shape and group size -> MultiKernelDelta on `device`."""
    if not deltas:
        raise ValueError("prepare_multi_delta needs at least one delta")
    shape = tuple(deltas[0].shape)
    groups = {b.V.group_size for cm in deltas for b in cm.bands}
    for t, cm in enumerate(deltas):
        if tuple(cm.shape) != shape:
            raise ValueError(f"delta {t} has shape {tuple(cm.shape)}, delta 0 has {shape}")
    if len(groups) > 1:
        raise ValueError(f"the deltas use different group sizes {sorted(groups)}; the kernels "
                         f"take one")
    device = torch.device(device)
    kds = [prepare_delta(cm, device) for cm in deltas]
    S, vw, vs, vz, uw, us, uz, tiles, ublocks, urange, dev_bytes = ([] for _ in range(11))
    off = dict(s=0, vw=0, vs=0, uw=0, us=0, ub=0)
    max_tiles = max(1, max(sum(-(-b[2] // TILE) for b in kd.v_bands) for kd in kds))
    for kd in kds:
        rows = [[c, wb + off["vw"], r, col0, nblk, sb + off["vs"], zb, rb, rb + off["s"], 0]
                for c, wb, r, nblk, sb, zb, rb in kd.v_bands for col0 in range(0, r, TILE)]
        tiles += rows + [[0] * V_COLS] * (max_tiles - len(rows))
        n_ub = kd.u_blocks.shape[0] if kd.rank else 0
        ub = kd.u_blocks[:n_ub].clone()
        ub[:, 1] += off["uw"]
        ub[:, 5] += off["us"]
        ublocks.append(ub)
        urange.append([off["ub"], n_ub])
        parts = (kd.S, kd.v_words, kd.v_scale, kd.v_zero, kd.u_words, kd.u_scale, kd.u_zero)
        for lst, t in zip((S, vw, vs, vz, uw, us, uz), parts):
            lst.append(t)
        dev_bytes.append(sum(t.numel() * t.element_size() for t in parts)
                         + 4 * (len(rows) * V_COLS + n_ub * U_COLS))
        for k, t in zip(("s", "vw", "vs", "us", "ub"),
                        (kd.S, kd.v_words, kd.v_scale, kd.u_scale, ub)):
            off[k] += t.shape[0]
        off["uw"] += kd.u_words.numel()
        for name, size in (("phase-V words", off["vw"]), ("phase-U words", off["uw"])):
            if size >= 2**31:
                raise ValueError(f"{name} of {len(deltas)} deltas: {size} words do not fit "
                                 f"int32 offsets; use fewer tenants per MultiKernelDelta")
    block_o = math.gcd(kds[0].group_size, 128)
    n_locks = (2 * len(kds) + 4) * max(max_tiles, -(-shape[0] // block_o))
    u_blocks = torch.cat(ublocks)
    return MultiKernelDelta(
        shape, kds[0].group_size, tuple(sorted({c for kd in kds for c in kd.containers})),
        tuple(kd.rank for kd in kds), tuple(kd.nbytes for kd in kds), tuple(dev_bytes),
        torch.cat(S), torch.cat(vw), torch.cat(vs), torch.cat(vz),
        torch.tensor(tiles, dtype=torch.int32, device=device), max_tiles,
        max((band[3] for kd in kds for band in kd.v_bands), default=0),
        torch.cat(uw), torch.cat(us), torch.cat(uz),
        u_blocks if u_blocks.shape[0] else torch.zeros(1, U_COLS, dtype=torch.int32,
                                                       device=device),
        torch.tensor(urange, dtype=torch.int32, device=device),
        max(n for _, n in urange), max(kd.z.shape[1] for kd in kds),
        max(1, max(kd.rank for kd in kds)),
        torch.zeros(n_locks, dtype=torch.int32, device=device))


# ----------------------------------------------------------------------------------------------
# Multi-tenant Triton kernels: the per-band loops _v_band, _u_band, per tenant segment.


@triton.jit
def _multi_v_kernel(x_ptr, stride_xb, n_in, words_ptr, scale_ptr, zero_ptr, S_ptr, tiles_ptr,
                    max_tiles, segs_ptr, zpart_ptr, z_ptr, stride_z, locks_ptr, n_rows,
                    max_rank, n_split,
                    GROUP: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_I: tl.constexpr,
                    SPLIT: tl.constexpr, MAX_SPLIT: tl.constexpr,
                    C1: tl.constexpr, C2: tl.constexpr, C4: tl.constexpr, C8: tl.constexpr,
                    F1: tl.constexpr, F2: tl.constexpr, F4: tl.constexpr, F8: tl.constexpr):
    """Phase V for the rows of one tenant segment: z[rows] = (x[rows] V̂ₜ) ⊙ Sₜ, block order.

    Grid (segments, max_tiles, n_split). x is in sorted row order; z (n_rows, ·) too."""
    seg = tl.program_id(0)
    tile = tl.program_id(1)
    split = tl.program_id(2)
    tenant = tl.load(segs_ptr + seg * 3)
    row0 = tl.load(segs_ptr + seg * 3 + 1)
    n_batch = tl.load(segs_ptr + seg * 3 + 2)
    meta = tiles_ptr + (tenant * max_tiles + tile) * 10
    c = tl.load(meta)
    w_base = tl.load(meta + 1)
    n_cols = tl.load(meta + 2)
    col0 = tl.multiple_of(tl.load(meta + 3), BLOCK_I)
    nblk = tl.load(meta + 4)
    s_base = tl.load(meta + 5)
    z_base = tl.load(meta + 6)
    r_base = tl.load(meta + 7)
    S_base = tl.load(meta + 8)
    per = tl.cdiv(nblk, n_split)
    blk_lo = split * per
    blk_hi = tl.minimum(blk_lo + per, nblk)
    x_seg = x_ptr + row0 * stride_xb
    acc = tl.zeros((BLOCK_B, BLOCK_I), tl.float32)
    acc = _v_bands(acc, x_seg, stride_xb, n_batch, n_in, words_ptr, scale_ptr, zero_ptr, c,
                   w_base, s_base, n_cols, col0, blk_lo, blk_hi, GROUP, BLOCK_B, BLOCK_I,
                   C1, C2, C4, C8, F1, F2, F4, F8)

    b = tl.arange(0, BLOCK_B)
    i = col0 + tl.arange(0, BLOCK_I)                                         # band columns
    mask = (b[:, None] < n_batch) & (i[None, :] < n_cols)     # padding tiles: n_cols = 0
    pw = 32 // tl.maximum(c, 1)
    w = i // pw
    dst = z_ptr + (row0 + b[:, None]) * stride_z + z_base + (w // _ROWS) * (_ROWS * pw) \
        + (i % pw) * _ROWS + w % _ROWS                                       # block order
    S = tl.load(S_ptr + S_base + i, mask=i < n_cols, other=0.0)
    if not SPLIT:
        tl.store(dst, acc * S[None, :], mask=mask)
    else:
        lock = locks_ptr + seg * max_tiles + tile
        part = zpart_ptr + (split * n_rows + row0 + b[:, None]) * max_rank + r_base + i[None, :]
        tl.store(part, acc, mask=mask)
        tl.debug_barrier()                    # every thread's partial is written ...
        count = tl.atomic_add(lock, 1, sem="acq_rel")               # ... before the release
        if count == n_split - 1:              # the last program of this tile sums them
            total = tl.zeros((BLOCK_B, BLOCK_I), tl.float32)
            for s in tl.static_range(MAX_SPLIT):
                live = mask & (b[:, None] * 0 + s < n_split)
                total += tl.load(zpart_ptr + (s * n_rows + row0 + b[:, None]) * max_rank
                                 + r_base + i[None, :], mask=live, other=0.0,
                                 cache_modifier=".cg")
            tl.store(dst, total * S[None, :], mask=mask)
            tl.atomic_xchg(lock, 0)


@triton.jit
def _multi_u_kernel(z_ptr, stride_z, n_out, words_ptr, scale_ptr, zero_ptr, blocks_ptr,
                    range_ptr, segs_ptr, n_tiles, ypart_ptr, n_rows, y_ptr, stride_y, base_ptr,
                    stride_base, order_ptr, locks_ptr, n_split,
                    HAS_BASE: tl.constexpr, GROUP: tl.constexpr, BLOCK_B: tl.constexpr,
                    BLOCK_O: tl.constexpr, SPLIT: tl.constexpr, MAX_SPLIT: tl.constexpr,
                    C1: tl.constexpr, C2: tl.constexpr, C4: tl.constexpr, C8: tl.constexpr):
    """Phase U for the rows of one tenant segment: y[order[rows]] = z[rows] Ûₜᵀ (+ base).

    Grid (segments, ⌈out/BLOCK_O⌉, n_split); the tenant's blocks are rows
    u_range[t, 0] .. + u_range[t, 1] of the block table (_u_kernel's layout)."""
    seg = tl.program_id(0)
    tile = tl.program_id(1)
    split = tl.program_id(2)
    tenant = tl.load(segs_ptr + seg * 3)
    row0 = tl.load(segs_ptr + seg * 3 + 1)
    n_batch = tl.load(segs_ptr + seg * 3 + 2)
    first = tl.load(range_ptr + tenant * 2)
    n_blocks = tl.load(range_ptr + tenant * 2 + 1)
    o = tile * BLOCK_O + tl.arange(0, BLOCK_O)
    omask = o < n_out
    grp = tile * BLOCK_O // GROUP
    per = tl.cdiv(n_blocks, n_split)
    y = _u_tile(z_ptr + row0 * stride_z, stride_z, n_batch, n_out, words_ptr, scale_ptr,
                zero_ptr, blocks_ptr, first + split * per,
                first + tl.minimum(split * per + per, n_blocks), grp, o, omask,
                BLOCK_B, BLOCK_O, C1, C2, C4, C8)                           # (BLOCK_B, BLOCK_O)

    b = tl.arange(0, BLOCK_B)
    bmask = b < n_batch
    row = tl.load(order_ptr + row0 + b, mask=bmask, other=0)                # original rows
    mask = bmask[:, None] & omask[None, :]
    dst = y_ptr + row[:, None] * stride_y + o[None, :]
    base = base_ptr + row[:, None] * stride_base + o[None, :]
    if not SPLIT:
        if HAS_BASE:
            y += tl.load(base, mask=mask, other=0.0).to(tl.float32)
        tl.store(dst, y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        lock = locks_ptr + seg * n_tiles + tile
        tl.store(ypart_ptr + (split * n_rows + row0 + b[:, None]) * n_out + o[None, :], y,
                 mask=mask)
        tl.debug_barrier()
        count = tl.atomic_add(lock, 1, sem="acq_rel")
        if count == n_split - 1:
            total = tl.zeros((BLOCK_B, BLOCK_O), tl.float32)
            for s in tl.static_range(MAX_SPLIT):
                live = mask & (b[:, None] * 0 + s < n_split)
                total += tl.load(ypart_ptr + (s * n_rows + row0 + b[:, None]) * n_out
                                 + o[None, :], mask=live, other=0.0, cache_modifier=".cg")
            if HAS_BASE:
                total += tl.load(base, mask=mask, other=0.0).to(tl.float32)
            tl.store(dst, total.to(y_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(lock, 0)


# ----------------------------------------------------------------------------------------------
# Multi-tenant launch configuration and wrappers.


def choose_multi_config(md: MultiKernelDelta, n_seg: int, sm_count: int,
                        waves: int = 4) -> KernelConfig:
    """choose_config for a grid of n_seg segments: split each reduction until there
    are ~`waves` programs per SM, no further than one 16-row block per program."""
    block_o = math.gcd(md.group_size, 128)
    target = waves * sm_count
    u_tiles = -(-md.shape[0] // block_o)
    split_v = max(1, min(md.max_blocks, -(-target // (n_seg * md.max_tiles)), MAX_SPLIT))
    split_u = max(1, min(md.max_u_blocks, -(-target // (n_seg * u_tiles)), MAX_SPLIT))
    return KernelConfig(split_v, split_u, 1, block_o, waves)


def multi_delta_matmul_triton(x: torch.Tensor, md: MultiKernelDelta, plan: TenantPlan,
                              base: torch.Tensor | None = None,
                              config: KernelConfig | None = None) -> torch.Tensor:
    """x (B, in) fp16/bf16 contiguous, rows as in `plan` -> x Δ̂ₜᵀ (+ base) (B, out)."""
    B, in_f = x.shape
    out_f = md.shape[0]
    xs = x if plan.is_sorted else x.index_select(0, plan.order)              # (B, in) sorted
    y = torch.empty(B, out_f, dtype=x.dtype, device=x.device)
    z = torch.zeros(B, md.z_width, dtype=torch.float32, device=x.device)    # see docstring
    sm = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
    flags, folds = width_args(md.containers, md.group_size)
    g = md.group_size
    base_arg = base if base is not None else y
    for block_b, segs, n_seg in plan.groups:
        cfg = config or choose_multi_config(md, n_seg, sm)
        if g % cfg.block_o:
            raise ValueError(f"block_o={cfg.block_o} must divide the group size {g}")
        if cfg.warps_v != 1:
            raise ValueError("the multi-tenant kernels use warps_v = 1 (128-vector tiles)")
        u_tiles = -(-out_f // cfg.block_o)
        need = n_seg * max(md.max_tiles, u_tiles)
        if need > md.locks.numel():     # many segments (tenants with > 64 rows): more counters
            md.locks = torch.zeros(need, dtype=torch.int32, device=x.device)
        zpart = torch.empty(cfg.split_v if cfg.split_v > 1 else 0, B, md.max_rank,
                            dtype=torch.float32, device=x.device)
        ypart = torch.empty(cfg.split_u if cfg.split_u > 1 else 0, B, out_f,
                            dtype=torch.float32, device=x.device)
        _multi_v_kernel[(n_seg, md.max_tiles, cfg.split_v)](
            xs, xs.stride(0), in_f, md.v_words, md.v_scale, md.v_zero, md.S, md.v_tiles,
            md.max_tiles, segs, zpart, z, z.stride(0), md.locks, B, md.max_rank, cfg.split_v,
            GROUP=g, BLOCK_B=block_b, BLOCK_I=TILE, SPLIT=cfg.split_v > 1,
            MAX_SPLIT=triton.next_power_of_2(cfg.split_v),
            **flags, **folds,
            num_warps=1 if block_b == 1 else 4)
        _multi_u_kernel[(n_seg, u_tiles, cfg.split_u)](
            z, z.stride(0), out_f, md.u_words, md.u_scale, md.u_zero, md.u_blocks, md.u_range,
            segs, u_tiles, ypart, B, y, y.stride(0), base_arg, base_arg.stride(0), plan.order,
            md.locks, cfg.split_u,
            HAS_BASE=base is not None, GROUP=g, BLOCK_B=block_b, BLOCK_O=cfg.block_o,
            SPLIT=cfg.split_u > 1, MAX_SPLIT=triton.next_power_of_2(cfg.split_u),
            **flags,
            num_warps=max(1, cfg.block_o // 128) if block_b == 1 else 4)
    return y


def multi_delta_matmul(x: torch.Tensor, deltas: MultiKernelDelta | Sequence[CompressedMatrix],
                       tenant_idx=None, base: torch.Tensor | None = None, backend: str = "auto",
                       plan: TenantPlan | None = None,
                       config: KernelConfig | None = None) -> torch.Tensor:
    """x (..., in), tenant_idx (...) ints in [0, N) -> (..., out): row b gets
    x[b] Δ̂_{tenant_idx[b]}ᵀ, plus `base` (..., out) if given, in x.dtype.

    backend as delta_matmul: "auto" = Triton for fp16/bf16 CUDA tensors, else the
    reference; "triton" (also CPU tensors under TRITON_INTERPRET=1); "reference" (needs the
    CompressedMatrix list). `plan` (plan_tenants of the flattened index) may be passed instead
    of tenant_idx to reuse one plan across the layers of a forward pass."""
    n = deltas.n_tenants if isinstance(deltas, MultiKernelDelta) else len(deltas)
    if n == 0:
        raise ValueError("no deltas given")
    out_f, in_f = deltas.shape if isinstance(deltas, MultiKernelDelta) else deltas[0].shape
    backend = resolve_backend(x, (out_f, in_f), base, backend)
    if (tenant_idx is None) == (plan is None):
        raise ValueError("give exactly one of tenant_idx and plan")
    lead = x.shape[:-1]
    if backend == "reference":
        if isinstance(deltas, MultiKernelDelta):
            raise ValueError("the reference backend needs the CompressedMatrix list, "
                             "not a MultiKernelDelta")
        if tenant_idx is None:
            raise ValueError("the reference backend takes tenant_idx, not a plan")
        y = multi_delta_matmul_reference(x, deltas, tenant_idx)
        return y if base is None else base + y
    md = deltas if isinstance(deltas, MultiKernelDelta) else prepare_multi_delta(deltas,
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
    return multi_delta_matmul_triton(x2, md, plan, b2, config).reshape(*lead, out_f)


# ----------------------------------------------------------------------------------------------
# Serving N fine-tunes of one base: one layer, then a whole model.


class TenantBatch:
    """The tenant of every sequence of one batch, with its plans cached by row layout: every
    MultiDeltaLinear of a forward pass sees the same rows, so the plan is made once."""

    def __init__(self, tenant_idx, n_tenants: int):
        shape = tuple(torch.as_tensor(tenant_idx).shape)
        if len(shape) != 1:
            raise ValueError(f"tenant_idx must be 1-D (one tenant per sequence), got shape "
                             f"{shape}")
        self.idx = check_tenant_idx(tenant_idx, shape, n_tenants)              # (batch,)
        self.n_tenants = n_tenants
        self._plans: dict = {}

    def rows(self, lead: tuple) -> torch.Tensor:
        """Per-sequence index -> one index per row of an input with leading shape `lead`."""
        if not lead or lead[0] != self.idx.shape[0]:
            raise ValueError(f"{self.idx.shape[0]} tenant indices for an input of leading "
                             f"shape {tuple(lead)}: give one per sequence (dim 0)")
        return self.idx.view(-1, *[1] * (len(lead) - 1)).expand(lead).reshape(-1)

    def plan(self, lead: tuple, device) -> TenantPlan:
        key = (tuple(lead), str(device))
        if key not in self._plans:
            self._plans[key] = plan_tenants(self.rows(lead), self.n_tenants, device)
        return self._plans[key]


class MultiDeltaLinear(torch.nn.Module):
    """A base nn.Linear plus N compressed deltas of its weight:
    forward(x, tenant_idx)[b] = base(x[b]) + x[b] Δ̂_{tenant_idx[b]}ᵀ.

    tenant_idx: one index per row (shape x.shape[:-1]) or per sequence (shape x.shape[:1]);
    None uses the batch set by `use_tenants` (how a patched model is called). The base GEMM
    runs once for the whole batch; the deltas are prepared for the kernels on first use on a
    CUDA device (a one-time repack); the base layer's parameters are shared, not copied."""

    def __init__(self, base: torch.nn.Linear, deltas: Sequence[CompressedMatrix],
                 backend: str = "auto"):
        super().__init__()
        if not deltas:
            raise ValueError("MultiDeltaLinear needs at least one delta")
        for t, cm in enumerate(deltas):
            if tuple(base.weight.shape) != tuple(cm.shape):
                raise ValueError(f"base weight is {tuple(base.weight.shape)}, delta {t} is "
                                 f"{tuple(cm.shape)}")
        if backend not in ("auto", "triton", "reference"):
            raise ValueError(f"backend must be 'auto', 'triton' or 'reference', got {backend!r}")
        self.base, self.deltas, self.backend = base, list(deltas), backend
        self.tenants: TenantBatch | None = None
        self._prepared: MultiKernelDelta | None = None

    def forward(self, x: torch.Tensor, tenant_idx=None) -> torch.Tensor:
        y = self.base(x)
        lead = tuple(x.shape[:-1])
        n = len(self.deltas)
        if tenant_idx is None and self.tenants is None:
            raise ValueError("MultiDeltaLinear needs tenant_idx: pass it, or call the model "
                             "inside `with use_tenants(model, tenant_idx):`")
        if tenant_idx is None:
            batch = self.tenants
        elif tuple(torch.as_tensor(tenant_idx).shape) == lead:               # one per row
            batch = None
            rows = check_tenant_idx(tenant_idx, lead, n).reshape(-1)          # (B,)
        else:                                                                # one per sequence
            batch = TenantBatch(tenant_idx, n)
        if batch is not None:
            rows = batch.rows(lead)                                          # (B,)
        use_triton = self.backend == "triton" or (
            self.backend == "auto" and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16))
        if not use_triton:
            if self.deltas[0].bands and self.deltas[0].bands[0].S.device != x.device:
                self.deltas = [cm.to(x.device) for cm in self.deltas]
            return multi_delta_matmul(x, self.deltas, rows.view(lead), y, backend="reference")
        if self._prepared is None or self._prepared.S.device != x.device:
            self._prepared = prepare_multi_delta(self.deltas, x.device)
        plan = batch.plan(lead, x.device) if batch is not None else \
            plan_tenants(rows, n, x.device)
        return multi_delta_matmul(x, self._prepared, None, y, backend="triton", plan=plan)

    def extra_repr(self) -> str:
        ranks = [sum(b.rank for b in cm.bands) for cm in self.deltas]
        return f"tenants={len(self.deltas)}, ranks={ranks}, backend={self.backend}"


def patch_model_tenants(model: torch.nn.Module, delta_paths: Sequence,
                        backend: str = "auto") -> list[str]:
    """Turn `model` (holding the BASE weights) into N fine-tunes at once, in place: every
    compressed matrix NAME.weight swaps the nn.Linear at NAME for a MultiDeltaLinear holding
    the N deltas (tenant t = delta_paths[t]). Returns the patched names.

    All files must compress the same matrices. Carried tensors (norms, embeddings, lm_head:
    whatever the fine-tunes changed outside the compressed matrices) are shared by every
    tenant of one model, so they must be equal in all N files; they are then copied into the
    model. Tenants that differ there cannot share one model: that is an error, naming the
    tensor. Call the model inside `use_tenants(model, tenant_idx)`."""
    paths = [Path(p) for p in delta_paths]
    if not paths:
        raise DeltaComeError("patch_model_tenants needs at least one delta file")
    files = [read_delta_file(p) for p in paths]
    names = list(files[0].matrices)
    for p, f in zip(paths[1:], files[1:]):
        if set(f.matrices) != set(names):
            odd = sorted(set(f.matrices) ^ set(names))[0]
            raise DeltaComeError(f"{p} and {paths[0]} compress different matrices "
                                 f"(e.g. {odd}): not fine-tunes of one base model?")
    for name in sorted(set().union(*(f.carried for f in files))):
        first = next(t for t, f in enumerate(files) if name in f.carried)
        for t, f in enumerate(files):
            if name not in f.carried or not torch.equal(f.carried[name],
                                                        files[first].carried[name]):
                raise DeltaComeError(f"carried tensor {name} differs between {paths[first]} "
                                     f"and {paths[t]}: tenants of one model must share every "
                                     f"tensor outside the compressed matrices")
    copy_carried(model, files[0].carried, paths[0])
    for name in names:
        replace_linear(model, name, lambda layer: MultiDeltaLinear(
            layer, [f.matrices[name] for f in files], backend), paths[0])
    return names


@contextmanager
def use_tenants(model: torch.nn.Module, tenant_idx):
    """Within the block, every MultiDeltaLinear of `model` serves sequence i of the batch with
    tenant tenant_idx[i] (tenant_idx: (batch,) ints). The plan is made once for the batch."""
    layers = [m for m in model.modules() if isinstance(m, MultiDeltaLinear)]
    if not layers:
        raise ValueError("the model has no MultiDeltaLinear layers: patch_model_tenants first")
    batch = TenantBatch(tenant_idx, len(layers[0].deltas))
    for m in layers:
        if len(m.deltas) != batch.n_tenants:
            raise ValueError(f"layers hold {len(m.deltas)} and {batch.n_tenants} deltas")
        m.tenants = batch
    try:
        yield batch
    finally:
        for m in layers:
            m.tenants = None
