"""Delta-CoMe: training-free mixed-precision compression of fine-tuned LLM weight deltas.

A fine-tune differs from its base by Δ = W_ft − W_base in every weight. The singular values
of Δ are long-tailed, so we write Δ = U diag(S) Vᵀ and quantize the singular vectors with
*mixed precision*: many bits for the few vectors of large S, 2 bits for the long middle,
nothing for the tail. No training, no calibration data.

The file reads top to bottom in the order of the method:

    checkpoints  -> read BASE and FT tensor by tensor (single file or sharded HF directory)
    delta, SVD   -> Δ in fp32, its singular triplets
    quantizer    -> asymmetric min-max per group of 128, dense bit packing
    allocation   -> greedy marginal-return bit widths under an exact byte budget (ours),
                    the paper's 8/3/2 preset, or a manual band spec
    compression  -> quantize V, refit U against the quantized V, quantize U
    format       -> one .safetensors file, self-describing metadata, written atomically
    apply / info -> rebuild W_base + Δ̂ as a checkpoint; summarize a delta file
    CLI

Public entry points: `compress_matrix` / `decompress_matrix` (one matrix), `compress`
(a checkpoint pair to a delta file), `apply` (back to a checkpoint), `read_delta_file`.

Usage:
    python deltacome.py BASE FT OUT                # compress at 1/16 of the fp16 delta
    python deltacome.py compress BASE FT OUT       # the same, the command named
    python deltacome.py apply BASE OUT.safetensors MERGED
    python deltacome.py info OUT.safetensors
    python deltacome.py example /tmp/deltacome-demo  # make a tiny pair, compress, apply
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import errno
import heapq
import itertools
import json
import math
import os
import re
import resource
import secrets
import shutil
import struct
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

FORMAT_NAME = "deltacome"
FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)              # version 1 files predate the `dtypes` entry (format, below)


class DeltaComeError(Exception):
    """A problem with the user's input: reported as one line, exit status 2."""


@dataclass
class Config:
    budget: float = 1 / 16          # stored bytes per matrix / fp16 delta bytes (2·out·in)
    method: str = "greedy"          # "greedy", "paper", or a band spec such as "8:2,3:32,2:*"
    widths: tuple[int, ...] = (2, 3, 4, 8)  # candidate bit widths for greedy (0 is implicit)
    group_size: int = 128           # elements of one singular vector sharing a scale/zero
    refit: bool = True              # refit U against the quantized V before quantizing U
    quantizer: str = "mse"          # "mse" (clipping search + least squares) or "minmax"
    include: str = r"\.(layers|h|blocks|block|layer)\.\d+\..*\.weight$"  # matrices to compress
    device: str = "auto"            # "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...
    svd: str = "gram"               # "gram" (fp64 Gram eigh), "full" or "lowrank" (randomized)


# ----------------------------------------------------------------------------------------------
# Checkpoints: a single .safetensors file or a HF directory (one file, or shards + index).
# Tensors are read one at a time through safe_open, so memory holds a few matrices, not models.


def checkpoint_files(path: str | Path) -> dict[str, Path]:
    """Map every tensor name of a checkpoint to the .safetensors file that holds it."""
    path = Path(path)
    if not path.exists():
        raise DeltaComeError(f"{path}: no such file or directory")
    if path.is_file():
        files = [path]
    else:
        index = path / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise DeltaComeError(f"{index}: not a valid safetensors index ({e})") from None
            return {name: path / shard for name, shard in weight_map.items()}
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            pickles = ", ".join(p.name for p in sorted(path.glob("*.bin")))
            hint = f" (it holds {pickles}: {PICKLE_HINT})" if pickles and not files else ""
            raise DeltaComeError(f"{path}: expected model.safetensors.index.json or exactly one "
                                 f".safetensors file, found {len(files)}{hint}")
    names = {}
    for file in files:
        with open_safetensors(file) as f:
            names.update({name: file for name in f.keys()})
    return names


PICKLE_HINT = ("PyTorch pickles are not read, as unpickling can run code; save the model "
               "with save_pretrained(..., safe_serialization=True) or safetensors first")


@contextlib.contextmanager
def open_safetensors(file: Path):
    """safe_open with its errors (missing, truncated, corrupt header) turned into one line."""
    if Path(file).is_dir():
        raise DeltaComeError(f"{file}: is a directory, not a .safetensors file")
    if not Path(file).is_file():
        raise DeltaComeError(f"{file}: no such file")
    try:
        handle = safe_open(str(file), framework="pt")
    except Exception as e:  # safetensors raises its own error types for bad headers
        if is_pickle(file):
            raise DeltaComeError(f"{file}: not a safetensors file; it looks like a PyTorch "
                                 f"pickle (torch.save, pytorch_model.bin): {PICKLE_HINT}") from None
        raise DeltaComeError(f"{file}: not a readable safetensors file ({e})") from None
    with handle as f:
        yield f


def is_pickle(file: Path) -> bool:
    """Whether a file starts like torch.save's output: a zip archive (PyTorch ≥ 1.6) or a
    pickle stream (protocol 2 and up open with the PROTO opcode 0x80)."""
    with open(file, "rb") as f:
        head = f.read(4)
    return head.startswith(b"PK\x03\x04") or (len(head) >= 2 and head[0] == 0x80
                                               and 2 <= head[1] <= 5)


class CheckpointReader:
    """Reads tensors of one checkpoint by name, keeping one shard open at a time."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.files = checkpoint_files(path)
        self._file, self._handle, self._stack = None, None, contextlib.ExitStack()

    def names(self) -> list[str]:
        return list(self.files)

    def get(self, name: str) -> torch.Tensor:
        file = self.files[name]
        if file != self._file:
            self._stack.close()
            self._handle = self._stack.enter_context(open_safetensors(file))
            self._file = file
        try:
            return self._handle.get_tensor(name)
        except Exception as e:
            raise DeltaComeError(f"{file}: cannot read tensor {name} ({e})") from None

    def close(self):
        self._stack.close()


def check_finite(name: str, t: torch.Tensor, where: str):
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise DeltaComeError(f"{where}: tensor {name} contains NaN or Inf")


# ----------------------------------------------------------------------------------------------
# Delta and SVD.


def extract_delta(w_base: torch.Tensor, w_ft: torch.Tensor, name: str = "weight") -> torch.Tensor:
    """Δ = W_ft − W_base in fp32, whatever the checkpoint dtypes: BASE and FT may hold
    different float dtypes (an fp16 base, a bf16 fine-tune), as fp32 holds both exactly."""
    if w_base.shape != w_ft.shape:
        raise DeltaComeError(f"tensor {name}: shape {tuple(w_base.shape)} in BASE but "
                             f"{tuple(w_ft.shape)} in FT (different architectures?)")
    if w_base.dtype != w_ft.dtype and not (w_base.is_floating_point()
                                           and w_ft.is_floating_point()):
        raise DeltaComeError(f"tensor {name}: dtype {w_base.dtype} in BASE but {w_ft.dtype} in FT")
    return w_ft.float() - w_base.float()


def svd_delta(delta: torch.Tensor, rank: int | None = None, method: str = "full"):
    """Top singular triplets of Δ (out, in): U (out, r), S (r,) descending, V (in, r).

    "full": the exact LAPACK / cuSOLVER SVD. "gram": eigendecomposition of the smaller Gram
    matrix (ΔΔᵀ or ΔᵀΔ) in fp64, then the other side's vectors as Δᵀu/σ: exact to fp32
    precision for every triplet the budget can keep (σ_i ≥ 1e-6·σ_1 — the squaring costs
    fp64 half its digits, leaving ~8), and faster than "full" on a GPU.
    "lowrank": randomized SVD of just the `rank` leading triplets (Halko et al., 2 power
    iterations, rank/4 + 16 extra columns): fastest, approximate in the tail.
    The README measures the final compression error of each against "full".
    """
    out_f, in_f = delta.shape
    k = min(out_f, in_f)
    rank = k if rank is None else min(rank, k)
    if method == "full":
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        V = Vh.mT
    elif method == "gram":
        tall = out_f >= in_f                            # eigendecompose the k × k Gram
        A = (delta.mT if tall else delta).double()      # (k, other)
        evals, evecs = torch.linalg.eigh(A @ A.mT)      # ascending
        S = evals.flip(0)[:rank].clamp_min(0).sqrt()
        small = evecs.flip(1)[:, :rank]                 # (k, rank) vectors of the small side
        big = A.mT @ small                              # (other, rank), norms σ_i
        big = big / big.norm(dim=0).clamp_min(1e-300)   # unit, even where σ_i ≈ 0
        U, V = (big, small) if tall else (small, big)
        U, S, V = U.float(), S.float(), V.float()
    elif method == "lowrank":
        if rank + rank // 4 + 16 >= k // 2:             # no cheaper than the full SVD
            return svd_delta(delta, rank, "full")
        U, S, V = torch.svd_lowrank(delta, q=rank + rank // 4 + 16, niter=2)
    else:
        raise ValueError(f"svd method must be 'full', 'gram' or 'lowrank', got {method!r}")
    return U[:, :rank], S[:rank], V[:, :rank]


# ----------------------------------------------------------------------------------------------
# Group quantizer. Each singular vector (a row of X below) is cut into groups of g consecutive
# elements; a group stores codes q in [0, 2^b − 1] and two fp16 numbers, `scale` and `zero`
# (the value of code 0), and reads back as x̂ = q·scale + zero. `zero` is the group minimum
# rounded *down* to fp16 and `scale` is rounded *up*, so the fp16 grid still covers
# [min, max] and rounding to the nearest code gives |x − x̂| ≤ scale/2 with the stored scale.


def round_fp16(x: torch.Tensor, direction: float) -> torch.Tensor:
    """fp32 -> fp16, rounded toward -inf (direction < 0) or +inf (direction > 0)."""
    h = x.half()
    off = (h.float() > x) if direction < 0 else (h.float() < x)
    return torch.where(off, torch.nextafter(h, torch.full_like(h, direction * math.inf)), h)


def quantize_groups(x: torch.Tensor, bits: int, group_size: int = 128, search: bool = False):
    """x (m, n) float -> codes (m, n) uint8, scale (m, G) fp16, zero (m, G) fp16; G = ⌈n/g⌉.

    search=False is plain min-max, with the |x − x̂| ≤ scale/2 guarantee. search=True also
    tries grids shrunk toward the group's middle (clipping its extremes), each refined by two
    rounds of least squares (codes -> the scale and zero that fit them best -> codes), and
    keeps per group whichever grid, min-max included, has the smallest squared error: the
    error never exceeds min-max's, and at 2 bits it is about half (README, quantizer).
    """
    assert 1 <= bits <= 8, f"bits must be in 1..8, got {bits}"
    assert x.ndim == 2, f"x must be (m, n), got {tuple(x.shape)}"
    m, n = x.shape
    groups = -(-n // group_size)
    pad = groups * group_size - n
    x = x.float()
    # Pad the last group with copies of its last element so padding never widens [min, max].
    xg = torch.cat([x, x[:, -1:].expand(m, pad)], 1).view(m, groups, group_size)
    levels = 2**bits - 1
    lo, hi = xg.amin(-1), xg.amax(-1)                                     # (m, G)
    zero = round_fp16(lo, -1)
    scale = round_fp16((hi - zero.float()) / levels, +1)
    if not (torch.isfinite(scale).all() and torch.isfinite(zero).all()):
        raise DeltaComeError("values out of fp16 range in quantize_groups")
    codes = grid_codes(xg, scale, zero, levels)
    if search:
        w = (torch.arange(groups * group_size, device=x.device) < n).float()
        w = w.view(1, groups, group_size)             # 0 on the padding: it must not count
        count = w.sum(-1)                                                  # (1, G)
        best = grid_error(xg, codes, scale, zero, w)
        mid, half = (lo + hi) / 2, (hi - lo) / 2
        ratios = torch.linspace(0.3, 0.95, 14, device=x.device)
        chunk = max(1, min(len(ratios), 2**25 // xg.numel()))   # ≤ 2^25 elements per temp
        for p in ratios.split(chunk):
            p = p.view(-1, 1, 1)                                # candidates (P, 1, 1)
            z, s = mid - p * half, (2 * p * half / levels).clamp_min(1e-12)      # (P, m, G)
            for _ in range(2):                      # least-squares refit of (s, z) to the codes
                q = grid_codes(xg, s, z, levels)
                q_mean, x_mean = (w * q).sum(-1) / count, (w * xg).sum(-1) / count
                var = (w * (q - q_mean.unsqueeze(-1)) ** 2).sum(-1)
                cov = (w * (q - q_mean.unsqueeze(-1)) * (xg - x_mean.unsqueeze(-1))).sum(-1)
                s = torch.where(var > 0, cov / var.clamp_min(1e-12), s).clamp_min(1e-12)
                z = x_mean - s * q_mean
            s16, z16 = s.half(), z.half()
            q = grid_codes(xg, s16, z16, levels)                            # (P, m, G, g)
            err, pick = grid_error(xg, q, s16, z16, w).min(0)               # (m, G) each
            better = err < best
            best = torch.where(better, err, best)
            pick = pick.unsqueeze(0)
            scale = torch.where(better, s16.gather(0, pick)[0], scale)
            zero = torch.where(better, z16.gather(0, pick)[0], zero)
            q = q.gather(0, pick.unsqueeze(-1).expand(1, *xg.shape))[0]
            codes = torch.where(better.unsqueeze(-1), q, codes)
    return codes.to(torch.uint8).view(m, -1)[:, :n], scale, zero


def grid_codes(xg, scale, zero, levels):
    """Nearest code on the grid zero + scale·{0..levels}: (m, G, g) float codes."""
    s = scale.float().unsqueeze(-1)
    q = torch.where(s > 0, (xg - zero.float().unsqueeze(-1)) / s, torch.zeros_like(xg))
    return q.round().clamp_(0, levels)


def grid_error(xg, codes, scale, zero, weight):
    """Squared error per group (m, G) of codes on a grid, elements weighted by `weight`."""
    xhat = codes * scale.float().unsqueeze(-1) + zero.float().unsqueeze(-1)
    return (weight * (xhat - xg) ** 2).sum(-1)


def dequantize_groups(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                      group_size: int = 128) -> torch.Tensor:
    """codes (m, n), scale/zero (m, G) -> x̂ (m, n) fp32."""
    m, n = codes.shape
    s = scale.float().repeat_interleave(group_size, 1)[:, :n]            # (m, n)
    z = zero.float().repeat_interleave(group_size, 1)[:, :n]
    return codes.float() * s + z


# Codes live in int32 words. A b-bit code takes a container of c = 1, 2, 4 or 8 bits (the
# smallest power of two ≥ b), so a word holds 32/c codes and every unpack is a shift and a
# mask with no code straddling two words. Only 3-bit (and 5–7-bit) codes waste space: a 4-bit
# container for 3 bits. Element j of a vector is code j % (32/c) of word j // (32/c), at bits
# [c·(j % (32/c)), c·(j % (32/c)) + c), least significant first.


def container_bits(bits: int) -> int:
    return 1 << (bits - 1).bit_length()


def pack_words(codes: torch.Tensor, c: int) -> torch.Tensor:
    """codes (..., 32/c) < 2^c -> (...) int32 words, code k at bits [c·k, c·k + c)."""
    shifts = torch.arange(32 // c, device=codes.device, dtype=torch.int64) * c
    packed = (codes.to(torch.int64) << shifts).sum(-1)                  # (...) < 2^32
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes (m, n) uint8 < 2^bits -> words (m, ⌈n / (32/c)⌉) int32."""
    c = container_bits(bits)
    per_word = 32 // c
    m, n = codes.shape
    words = -(-n // per_word)
    padded = torch.zeros(m, words * per_word, dtype=torch.uint8, device=codes.device)
    padded[:, :n] = codes
    return pack_words(padded.view(m, words, per_word), c)


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """words (m, W) int32 -> codes (m, n) uint8; exact inverse of pack_codes."""
    c = container_bits(bits)
    per_word = 32 // c
    shifts = torch.arange(per_word, device=packed.device, dtype=torch.int64) * c
    codes = (packed.to(torch.int64).unsqueeze(-1) & 0xFFFFFFFF) >> shifts & (2**c - 1)
    return codes.view(packed.shape[0], -1)[:, :n].to(torch.uint8)


@dataclass
class QuantizedVectors:
    """m vectors of length n at one bit width: the stored form of one band of U or V."""
    codes: torch.Tensor   # (m, ⌈n / (32/c)⌉) int32, packed
    scale: torch.Tensor   # (m, ⌈n / g⌉) fp16
    zero: torch.Tensor    # (m, ⌈n / g⌉) fp16
    bits: int
    n: int
    group_size: int


def quantize_vectors(x: torch.Tensor, bits: int, group_size: int = 128,
                     search: bool = True) -> QuantizedVectors:
    """x (m, n): m vectors, one per row -> packed QuantizedVectors (MSE-searched grids)."""
    codes, scale, zero = quantize_groups(x, bits, group_size, search)
    return QuantizedVectors(pack_codes(codes, bits), scale, zero, bits, x.shape[1], group_size)


def dequantize_vectors(qv: QuantizedVectors) -> torch.Tensor:
    """QuantizedVectors -> (m, n) fp32."""
    codes = unpack_codes(qv.codes, qv.bits, qv.n)
    return dequantize_groups(codes, qv.scale, qv.zero, qv.group_size)


# ----------------------------------------------------------------------------------------------
# Bytes. Every stored byte of a compressed matrix is counted: for each kept singular triplet,
# the packed codes of u and v, their fp16 scales and zeros, and its fp32 singular value.


def packed_bytes(n: int, bits: int, group_size: int = 128) -> int:
    """Bytes one vector of length n takes at `bits`: int32 words + fp16 scale and zero."""
    per_word = 32 // container_bits(bits)
    return 4 * -(-n // per_word) + 2 * 2 * -(-n // group_size)


def vector_bytes(out_features: int, in_features: int, bits: int, group_size: int = 128) -> int:
    """Bytes one singular triplet costs when u and v are stored at `bits` (0 = dropped)."""
    if bits == 0:
        return 0
    return (packed_bytes(out_features, bits, group_size)
            + packed_bytes(in_features, bits, group_size) + 4)                # + fp32 σ


def budget_bytes(out_features: int, in_features: int, budget: float) -> int:
    """The byte budget of a matrix: `budget` × its fp16 delta (2 bytes per element)."""
    return int(budget * 2 * out_features * in_features)


# ----------------------------------------------------------------------------------------------
# Bit allocation.
#
# Greedy marginal return (ours). The reconstruction error is modelled as
#     ‖Δ − Δ̂‖²_F ≈ Σ_i S_i² · ε_i(b_i),   ε_i(b) = ‖û_i v̂_iᵀ − u_i v_iᵀ‖²_F,  ε_i(0) = 1,
# with ε measured by actually quantizing each vector at each candidate width. Every vector
# starts at 0 bits; we repeatedly take the one upgrade (vector i from its width to any larger
# candidate) with the largest error drop per extra byte, until nothing more fits. That is the
# classic marginal-return rule: at the end no byte could move to buy a larger drop, up to the
# granularity of one vector. Widths are kept non-increasing along S (vector i may not exceed
# vector i−1), so the result is a few contiguous bands.


def vector_errors(U: torch.Tensor, V: torch.Tensor, widths, group_size: int = 128,
                  search: bool = True) -> torch.Tensor:
    """U (out, r), V (in, r) unit columns -> ε (r, len(widths)) fp64, ε_i(b) as above."""
    eps = []
    for bits in widths:
        if bits == 0:
            eps.append(torch.ones(U.shape[1], dtype=torch.float64, device=U.device))
            continue
        u, v = U.mT.double(), V.mT.double()                                  # (r, out), (r, in)
        uq = dequantize_vectors(quantize_vectors(U.mT, bits, group_size, search)).double()
        vq = dequantize_vectors(quantize_vectors(V.mT, bits, group_size, search)).double()
        # ‖ûv̂ᵀ − uvᵀ‖² = ‖û‖²‖v̂‖² − 2(û·u)(v̂·v) + ‖u‖²‖v‖²
        e = ((uq * uq).sum(1) * (vq * vq).sum(1) - 2 * (uq * u).sum(1) * (vq * v).sum(1)
             + (u * u).sum(1) * (v * v).sum(1))
        eps.append(e.clamp_min(0))
    return torch.stack(eps, 1)


def allocate_bits(S: torch.Tensor, eps: torch.Tensor, costs: list[int], widths: list[int],
                  budget: int) -> list[int]:
    """Greedy marginal-return allocation. S (r,), eps (r, W), costs[w] bytes of width widths[w]
    (widths ascending, widths[0] = 0) -> bit width per vector, non-increasing, Σ cost ≤ budget."""
    assert widths[0] == 0 and costs[0] == 0 and list(widths) == sorted(widths)
    r = len(S)
    weight = (S.double() ** 2).tolist()
    eps = eps.tolist()
    level = [0] * r               # index into widths, per vector
    spent = 0
    heap = []                     # (−gain per byte, vector, target level, stamp)
    stamp = [0] * r

    def push_best(i):
        """Queue vector i's best affordable upgrade, capped by its predecessor's width."""
        if i >= r:
            return
        stamp[i] += 1
        cap = level[i - 1] if i > 0 else len(widths) - 1
        best = None
        for t in range(level[i] + 1, cap + 1):
            extra = costs[t] - costs[level[i]]
            if spent + extra > budget:
                continue
            gain = weight[i] * (eps[i][level[i]] - eps[i][t])
            if gain > 0 and (best is None or gain / extra > best[0]):
                best = (gain / extra, t)
        if best is not None:
            heapq.heappush(heap, (-best[0], i, best[1], stamp[i]))

    push_best(0)
    while heap:
        _, i, t, s = heapq.heappop(heap)
        if s != stamp[i]:
            continue              # stale: vector i changed since this entry was queued
        extra = costs[t] - costs[level[i]]
        if spent + extra > budget:
            push_best(i)          # budget shrank since queued: look for a cheaper upgrade
            continue
        level[i] = t
        spent += extra
        push_best(i)
        push_best(i + 1)
    return [widths[lv] for lv in level]


def parse_bands(spec: str) -> list[tuple[int, int | None]]:
    """"8:2,3:32,2:*" -> [(8, 2), (3, 32), (2, None)]; None = as many as the budget allows."""
    bands = []
    for part in spec.split(","):
        try:
            bits, rank = part.split(":")
            bands.append((int(bits), None if rank.strip() == "*" else int(rank)))
        except ValueError:
            raise DeltaComeError(f"bad band spec {spec!r}: expected BITS:RANK[,BITS:RANK...], "
                                 f"RANK an integer or '*'") from None
        if not 1 <= bands[-1][0] <= 8 or (bands[-1][1] is not None and bands[-1][1] < 0):
            raise DeltaComeError(f"bad band spec {spec!r}: bits must be 1..8 and ranks ≥ 0")
    return bands


# The paper's release, per 4096×4096 matrix at 1/16: 2 vectors at 8 bits, 32 at 3, the rest of
# the budget at 2 (968 there). Bands are filled in order; each is cut short if the budget ends.
PAPER_BANDS = "8:2,3:32,2:*"


def bands_to_widths(bands, out_f: int, in_f: int, budget: int, group_size: int) -> list[int]:
    """A band spec -> bit width per vector, ranks capped so the bytes fit the budget."""
    widths, spent, k = [], 0, min(out_f, in_f)
    for bits, rank in bands:
        cost = vector_bytes(out_f, in_f, bits, group_size)
        fits = (budget - spent) // cost
        n = min(fits, k - len(widths), fits if rank is None else rank)
        widths += [bits] * n
        spent += n * cost
    return widths


# ----------------------------------------------------------------------------------------------
# One matrix: Δ -> bands of (S, Û, V̂), and back.


@dataclass
class Band:
    """Consecutive singular triplets stored at one bit width."""
    bits: int
    S: torch.Tensor           # (r,) fp32
    U: QuantizedVectors       # r vectors of length out
    V: QuantizedVectors       # r vectors of length in

    @property
    def rank(self) -> int:
        return self.S.numel()


@dataclass
class CompressedMatrix:
    shape: tuple[int, int]    # (out, in), PyTorch Linear layout
    dtype: str                # dtype of the original weight, e.g. "bfloat16"
    bands: list[Band] = field(default_factory=list)

    def nbytes(self) -> int:
        tensors = [t for b in self.bands for t in (b.S, b.U.codes, b.U.scale, b.U.zero,
                                                  b.V.codes, b.V.scale, b.V.zero)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def to(self, device) -> CompressedMatrix:
        """The same matrix with every tensor on `device`."""
        def qv(q):
            return QuantizedVectors(q.codes.to(device), q.scale.to(device), q.zero.to(device),
                                    q.bits, q.n, q.group_size)
        return CompressedMatrix(self.shape, self.dtype, [Band(b.bits, b.S.to(device), qv(b.U),
                                                              qv(b.V)) for b in self.bands])


def choose_widths(delta: torch.Tensor, cfg: Config):
    """SVD of Δ and a bit width per kept singular triplet, by cfg.method under cfg.budget."""
    out_f, in_f = delta.shape
    g = cfg.group_size
    budget = budget_bytes(out_f, in_f, cfg.budget)
    none = [], delta.new_zeros(out_f, 0), delta.new_zeros(0), delta.new_zeros(in_f, 0)
    if not delta.any():
        return none
    if cfg.method == "greedy":
        candidates = sorted({0, *cfg.widths})
        if candidates == [0]:
            raise DeltaComeError(f"widths {tuple(cfg.widths)}: no width of 1..8 bits to store a "
                                 f"vector at (0, dropping it, is always a candidate)")
        costs = [vector_bytes(out_f, in_f, b, g) for b in candidates]
        cheapest = min(costs[1:], default=budget + 1)
        max_rank = min(budget // cheapest, out_f, in_f)
        if max_rank > 0:
            U, S, V = svd_delta(delta, max_rank, cfg.svd)
            eps = vector_errors(U, V, candidates, g, cfg.quantizer == "mse")
            widths = [b for b in allocate_bits(S, eps, costs, candidates, budget) if b > 0]
    else:
        spec = parse_bands(PAPER_BANDS if cfg.method == "paper" else cfg.method)
        cheapest = min(vector_bytes(out_f, in_f, bits, g) for bits, _ in spec)
        widths = bands_to_widths(spec, out_f, in_f, budget, g)
        if widths:
            U, S, V = svd_delta(delta, len(widths), cfg.svd)
    if budget < cheapest:
        raise DeltaComeError(f"budget {cfg.budget:g} of a {out_f}x{in_f} delta is {budget} bytes, "
                             f"less than one singular vector costs ({cheapest} bytes)")
    return (widths, U, S, V) if widths else none


def bands_of(widths: list[int]) -> list[tuple[int, int, int]]:
    """[8, 8, 3, 2, 2] -> [(8, 0, 2), (3, 2, 3), (2, 3, 5)] as (bits, start, stop)."""
    bands, start = [], 0
    for i in range(1, len(widths) + 1):
        if i == len(widths) or widths[i] != widths[start]:
            bands.append((widths[start], start, i))
            start = i
    return bands


def compress_matrix(delta: torch.Tensor, cfg: Config = Config(), dtype: str = "float32"
                    ) -> CompressedMatrix:
    """Δ (out, in) fp32 -> CompressedMatrix whose stored bytes fit cfg.budget."""
    assert delta.ndim == 2, f"delta must be 2-D, got {tuple(delta.shape)}"
    widths, U, S, V = choose_widths(delta.float(), cfg)
    g, r, search = cfg.group_size, len(widths), cfg.quantizer == "mse"
    spans = bands_of(widths)
    U, S, V = U[:, :r], S[:r], V[:, :r]
    # Quantize V band by band. Then refit U: for fixed V̂, the least-squares left factor is
    # L = Δ V̂ (V̂ᵀV̂)⁻¹, which lets Û absorb V's quantization error. L's column norms become
    # the new S and its normalized columns are quantized as U. Without refit, L = U diag(S).
    V_q = [quantize_vectors(V[:, a:b].mT, bits, g, search) for bits, a, b in spans]
    if cfg.refit and r > 0:
        V_hat = torch.cat([dequantize_vectors(q) for q in V_q], 0).mT      # (in, r)
        gram = V_hat.mT @ V_hat                                               # (r, r)
        gram += 1e-6 * gram.diagonal().mean() * torch.eye(r, device=gram.device)
        L = torch.linalg.solve(gram, (delta.float() @ V_hat).mT).mT          # (out, r)
    else:
        L = U * S                                                             # (out, r)
    S_new = L.norm(dim=0)                                                     # (r,)
    U_unit = L / S_new.clamp_min(torch.finfo(torch.float32).tiny)
    bands = [Band(bits, S_new[a:b].contiguous(),
                  quantize_vectors(U_unit[:, a:b].mT, bits, g, search), vq)
             for (bits, a, b), vq in zip(spans, V_q)]
    return CompressedMatrix(tuple(delta.shape), dtype, bands)


def decompress_matrix(cm: CompressedMatrix) -> torch.Tensor:
    """CompressedMatrix -> Δ̂ (out, in) fp32 = Û diag(S) V̂ᵀ."""
    device = cm.bands[0].S.device if cm.bands else "cpu"
    delta = torch.zeros(cm.shape, device=device)                            # (out, in)
    for band in cm.bands:
        U = dequantize_vectors(band.U)                                      # (r, out)
        V = dequantize_vectors(band.V)                                      # (r, in)
        delta += (U.mT * band.S) @ V
    return delta


def relative_error(delta: torch.Tensor, approx: torch.Tensor) -> float:
    norm = delta.norm()
    return float((delta - approx.to(delta.device)).norm() / norm) if norm > 0 else 0.0


# ----------------------------------------------------------------------------------------------
# File format. One .safetensors file. For a compressed matrix NAME with bands k = 0, 1, ...:
#   NAME.band{k}.S             (r_k,)                fp32
#   NAME.band{k}.U.codes       (r_k, ⌈out/(32/c)⌉)   int32   packed rows, one per vector u_i
#   NAME.band{k}.U.scale/zero  (r_k, ⌈out/g⌉)        fp16
#   NAME.band{k}.V.*           same with `in` in place of `out`
# Tensors that are not compressed and differ from BASE are stored as `carry.NAME`, copied
# bit-exact from FT; the ones equal to BASE are not stored (apply takes BASE's). The metadata
# "deltacome" entry is JSON: format, version, group_size, config, and per matrix its shape,
# FT's dtype, bands [[bits, rank], ...] and relative error; the list of carried tensors; and
# `dtypes`, FT's dtype of every tensor whose dtype differs from BASE's (version 2; a version 1
# file has none: its fine-tune had BASE's dtypes throughout).
# Everything is vector-major and contiguous, so a kernel reads a band in coalesced rows.

DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
          torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16",
          torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


class SafetensorsWriter:
    """Writes a .safetensors file tensor by tensor without holding them all in memory.

    Data goes to a scratch file as it comes; `finish` writes the header, streams the data
    after it, and renames into place, so OUT is never seen half-written.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.header, self.offset = {}, 0
        self._data = tempfile.TemporaryFile(dir=self.path.parent)

    def add(self, name: str, tensor: torch.Tensor):
        assert name not in self.header, f"duplicate tensor {name}"
        t = tensor.detach().to("cpu").contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        self.header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape),
                             "data_offsets": [self.offset, self.offset + len(raw)]}
        self._data.write(raw)
        self.offset += len(raw)

    def finish(self, metadata: dict[str, str]):
        header = dict(self.header, __metadata__=metadata)
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)                    # data starts 8-byte aligned
        tmp = new_scratch(self.path.parent, f".{self.path.name}.")
        try:
            with open(tmp, "wb") as f:
                f.write(struct.pack("<Q", len(blob)) + blob)
                self._data.seek(0)
                shutil.copyfileobj(self._data, f, 1 << 24)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        finally:
            self._data.close()
            if os.path.exists(tmp):
                os.unlink(tmp)

    def abort(self):
        """Drop the scratch data; closing may fail again as its last write did (disk full)."""
        with contextlib.suppress(OSError):
            self._data.close()

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        if kind is not None:
            self.abort()


def new_scratch(parent: Path, prefix: str, directory: bool = False) -> Path:
    """A new empty file (or directory) in `parent`, named prefix + random hex, created with
    the permissions the umask gives any new file: mkstemp and mkdtemp make theirs private
    (0600, 0700), and the output renamed from it would keep them."""
    while True:
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            if directory:
                path.mkdir()
            else:
                os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return path
        except FileExistsError:
            continue


def output_error(out: Path, e: OSError) -> Exception:
    """An OSError as the error to report: one that names no file (a full disk's) becomes a
    DeltaComeError about the output being written, `out`."""
    if e.filename is not None:
        return e
    return DeltaComeError(f"{out}: cannot write it: {e.strerror or e}")


def add_compressed(writer: SafetensorsWriter, name: str, cm: CompressedMatrix):
    for k, band in enumerate(cm.bands):
        writer.add(f"{name}.band{k}.S", band.S.float())
        for side, qv in (("U", band.U), ("V", band.V)):
            writer.add(f"{name}.band{k}.{side}.codes", qv.codes)
            writer.add(f"{name}.band{k}.{side}.scale", qv.scale)
            writer.add(f"{name}.band{k}.{side}.zero", qv.zero)


@dataclass
class DeltaFile:
    """A delta file read back: its compressed matrices, carried tensors and metadata."""
    matrices: dict[str, CompressedMatrix]
    carried: dict[str, torch.Tensor]
    meta: dict


def read_delta_file(path: str | Path, device: str = "cpu") -> DeltaFile:
    """Load a delta file written by `compress`; the inverse of the format above."""
    with open_safetensors(Path(path)) as f:
        raw = (f.metadata() or {}).get(FORMAT_NAME)
        if raw is None:
            raise DeltaComeError(f"{path}: not a deltacome file (no '{FORMAT_NAME}' metadata)")
        meta = json.loads(raw)
        version = meta.get("version")
        if type(version) is not int or version not in READ_VERSIONS:  # not "1", not true
            raise DeltaComeError(f"{path}: format version {version!r} is not supported (this "
                                 f"reader knows the integers {', '.join(map(str, READ_VERSIONS))})")
        g = meta["group_size"]

        def get(key):
            return f.get_tensor(key).to(device)

        matrices = {}
        for name, m in meta["matrices"].items():
            out_f, in_f = m["shape"]
            bands = []
            for k, (bits, rank) in enumerate(m["bands"]):
                p = f"{name}.band{k}"
                U = QuantizedVectors(get(f"{p}.U.codes"), get(f"{p}.U.scale"),
                                     get(f"{p}.U.zero"), bits, out_f, g)
                V = QuantizedVectors(get(f"{p}.V.codes"), get(f"{p}.V.scale"),
                                     get(f"{p}.V.zero"), bits, in_f, g)
                bands.append(Band(bits, get(f"{p}.S"), U, V))
                assert bands[-1].rank == rank, f"{path}: {p} has rank {bands[-1].rank}, not {rank}"
            matrices[name] = CompressedMatrix((out_f, in_f), m["dtype"], bands)
        carried = {name: get(f"carry.{name}") for name in meta["carried"]}
    return DeltaFile(matrices, carried, meta)


def fine_tune_dtype(delta: DeltaFile, name: str, base_dtype: torch.dtype) -> torch.dtype:
    """The dtype tensor `name` has in the fine-tune: a carried tensor's own, else the one the
    file records for it (a compressed matrix's, or `dtypes`), else BASE's."""
    if name in delta.carried:
        return delta.carried[name].dtype
    text = (delta.matrices[name].dtype if name in delta.matrices
            else delta.meta.get("dtypes", {}).get(name))
    if text is None:
        return base_dtype
    dtype = getattr(torch, str(text), None)
    if not isinstance(dtype, torch.dtype):
        raise DeltaComeError(f"tensor {name}: unknown dtype {text!r} in the delta file")
    return dtype


# ----------------------------------------------------------------------------------------------
# Whole checkpoints: compress, apply, info.


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeltaComeError(f"--device {device}: CUDA is not available on this machine")
    return torch.device(device)


def check_writable(out: Path, directory_ok: bool = False):
    parent = out.resolve().parent
    if not parent.is_dir():
        raise DeltaComeError(f"{out}: directory {parent} does not exist")
    try:                            # probe for real: permission bits say nothing to root
        if not os.access(parent, os.W_OK):          # False on a read-only file system too
            code = errno.EROFS if os.statvfs(parent).f_flag & os.ST_RDONLY else errno.EACCES
            raise OSError(code, os.strerror(code))
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as e:
        raise DeltaComeError(f"{out}: directory {parent} is not writable ({e.strerror})") from None
    if out.is_dir() and not directory_ok:
        raise DeltaComeError(f"{out}: is a directory; the delta is written as one "
                             f".safetensors file")


def prefetched(fn, items, depth: int = 2):
    """Yield fn(item) for each item in order, computing up to `depth` ahead in one
    background thread (reading the next tensors while the GPU works on this one)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        queue = collections.deque()
        for item in items:
            queue.append(pool.submit(fn, item))
            if len(queue) > depth:
                yield queue.popleft().result()
        while queue:
            yield queue.popleft().result()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux reports KiB


@dataclass
class Summary:
    """What `compress` did, for the end-of-run table and for callers."""
    matrices: int = 0
    delta_fp16_bytes: int = 0        # 2 bytes per element of every compressed matrix
    compressed_bytes: int = 0        # every stored byte of those matrices
    carried_bytes: int = 0           # tensors copied from FT because they differ from BASE
    file_bytes: int = 0
    gpu_peak_bytes: int = 0
    errors: list[float] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(
        ("read", "svd+quantize", "write"), 0.0))

    def table(self) -> str:
        mean_err = sum(self.errors) / len(self.errors) if self.errors else 0.0
        ratio = self.compressed_bytes / max(self.delta_fp16_bytes, 1)
        whole = self.file_bytes / max(self.delta_fp16_bytes + self.carried_bytes, 1)
        rows = [("matrices compressed", f"{self.matrices}"),
                ("fp16 delta of those", f"{self.delta_fp16_bytes / 1e6:,.2f} MB"),
                ("compressed matrices", f"{self.compressed_bytes / 1e6:,.2f} MB "
                                        f"(ratio {ratio:.4f} = 1/{1 / max(ratio, 1e-12):.1f})"),
                ("carried tensors", f"{self.carried_bytes / 1e6:,.2f} MB"),
                ("whole file", f"{self.file_bytes / 1e6:,.2f} MB (ratio {whole:.4f} of fp16 "
                               f"delta + carried)"),
                ("mean rel. error", f"{mean_err:.4f}  ‖Δ−Δ̂‖/‖Δ‖ averaged over matrices"),
                ("time", "  ".join(f"{k} {v:.1f}s" for k, v in self.seconds.items())
                 + f"  total {sum(self.seconds.values()):.1f}s"),
                ("peak host RSS", f"{peak_rss_mb():,.0f} MB")]
        if self.gpu_peak_bytes:
            rows.append(("peak GPU memory", f"{self.gpu_peak_bytes / 1e6:,.0f} MB"))
        return "\n".join(f"{k:<22}{v}" for k, v in rows)


def compress(base: str | Path, ft: str | Path, out: str | Path, cfg: Config = Config(),
             progress: bool = True) -> Summary:
    """Compress FT's delta against BASE into the delta file OUT; returns a Summary.
    FT may hold other float dtypes than BASE (bf16 against fp16): Δ is taken in fp32 and the
    file records FT's dtypes, which `apply` writes."""
    from tqdm import tqdm

    out = Path(out)
    check_writable(out)
    device = pick_device(cfg.device)
    base_r, ft_r = CheckpointReader(base), CheckpointReader(ft)
    missing = sorted(set(base_r.names()) - set(ft_r.names()))
    extra = sorted(set(ft_r.names()) - set(base_r.names()))
    if missing or extra:
        which = f"tensor {missing[0]} is in BASE but missing in FT" if missing else \
            f"tensor {extra[0]} is in FT but not in BASE"
        raise DeltaComeError(f"{which} ({len(missing) + len(extra)} mismatched names; "
                             f"different architectures?)")
    include = re.compile(cfg.include)
    summary = Summary()
    meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "group_size": cfg.group_size,
            "config": asdict(cfg), "matrices": {}, "carried": [], "dtypes": {}}

    def read(name):                 # runs one tensor ahead in a thread: I/O overlaps the GPU
        w_base, w_ft = base_r.get(name), ft_r.get(name)
        check_finite(name, w_base, str(base))
        check_finite(name, w_ft, str(ft))
        return name, w_base, w_ft, extract_delta(w_base, w_ft, name)

    writer = SafetensorsWriter(out)
    reads = prefetched(read, base_r.names())
    items = tqdm(reads, desc="compress", total=len(base_r.names()), unit="tensor",
                 disable=not progress)
    try:
        t0 = time.perf_counter()
        for name, w_base, w_ft, delta in items:
            t1 = time.perf_counter()
            summary.seconds["read"] += t1 - t0
            t2 = t1
            if w_ft.dtype != w_base.dtype:
                meta["dtypes"][name] = str(w_ft.dtype).removeprefix("torch.")
            if w_base.ndim == 2 and include.search(name):
                delta = delta.to(device)
                cm = compress_matrix(delta, cfg, str(w_ft.dtype).removeprefix("torch."))
                err = relative_error(delta, decompress_matrix(cm))
                t2 = time.perf_counter()
                summary.seconds["svd+quantize"] += t2 - t1
                add_compressed(writer, name, cm)
                meta["matrices"][name] = {"shape": list(cm.shape), "dtype": cm.dtype,
                                          "bands": [[b.bits, b.rank] for b in cm.bands],
                                          "error": round(err, 6)}
                summary.matrices += 1
                summary.delta_fp16_bytes += 2 * delta.numel()
                summary.compressed_bytes += cm.nbytes()
                summary.errors.append(err)
            elif not torch.equal(w_base.to(w_ft.dtype), w_ft):     # BASE's, cast, is not FT's
                writer.add(f"carry.{name}", w_ft)
                meta["carried"].append(name)
                summary.carried_bytes += w_ft.numel() * w_ft.element_size()
            t0 = time.perf_counter()
            summary.seconds["write"] += t0 - t2
        t3 = time.perf_counter()
        writer.finish({FORMAT_NAME: json.dumps(meta)})
        summary.seconds["write"] += time.perf_counter() - t3
    except OSError as e:
        writer.abort()
        raise output_error(out, e) from None
    except BaseException:
        writer.abort()
        raise
    finally:
        reads.close()                   # no read runs on after an error
        items.close()                   # the bar ends its line before any error is printed
        base_r.close()
        ft_r.close()
    if device.type == "cuda":
        summary.gpu_peak_bytes = torch.cuda.max_memory_allocated(device)
    summary.file_bytes = out.stat().st_size
    return summary


def apply(base: str | Path, delta_path: str | Path, out: str | Path, device: str = "auto",
          progress: bool = True) -> Path:
    """Rebuild the fine-tune W_base + Δ̂ from BASE and a delta file, in BASE's layout and FT's
    dtypes (as the file records them; BASE's where FT had the same): a single file if BASE is
    a file, else a directory with BASE's shards, index, config and tokenizer files, the
    config's dtype set to FT's where FT's differed. Built under a scratch name with the
    usual permissions and renamed into place when complete."""
    from tqdm import tqdm

    base, out = Path(base), Path(out)
    dev = pick_device(device)
    files = checkpoint_files(base)
    delta = read_delta_file(delta_path)
    unknown = sorted((set(delta.matrices) | set(delta.carried)) - set(files))
    if unknown:
        raise DeltaComeError(f"{delta_path}: tensor {unknown[0]} is not in BASE {base} "
                             f"(a delta made against another base?)")
    parent = out.resolve().parent
    check_writable(out, directory_ok=True)
    scratch = new_scratch(parent, f".{out.name}.", directory=True)
    shards = sorted(set(files.values()))
    bar = tqdm(shards, desc="apply", unit="shard", disable=not progress)
    elements = collections.Counter()             # float elements written, by dtype
    try:
        for shard in bar:
            target = scratch / (out.name if base.is_file() else shard.name)
            with SafetensorsWriter(target) as writer, open_safetensors(shard) as f:
                meta = f.metadata() or {}
                for name in f.keys():
                    w = f.get_tensor(name)
                    dtype = fine_tune_dtype(delta, name, w.dtype)
                    if name in delta.matrices:
                        cm = delta.matrices[name]
                        if tuple(w.shape) != cm.shape:
                            raise DeltaComeError(f"tensor {name}: shape {tuple(w.shape)} in BASE "
                                                 f"but {cm.shape} in the delta file")
                        dhat = decompress_matrix(cm.to(dev))
                        w = (w.to(dev).float() + dhat).to(dtype)
                    elif name in delta.carried:
                        w = delta.carried[name]
                    else:
                        w = w.to(dtype)
                    if w.is_floating_point():
                        elements[w.dtype] += w.numel()
                    writer.add(name, w)
                writer.finish(meta)
        if base.is_dir():
            for extra in base.iterdir():
                if extra.is_file() and extra.suffix != ".safetensors":
                    shutil.copy2(extra, scratch / extra.name)
            if delta.meta.get("dtypes") and elements and (scratch / "config.json").is_file():
                set_config_dtype(scratch / "config.json", elements.most_common(1)[0][0])
            final = scratch
        else:
            final = scratch / out.name
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=parent, prefix=f".{out.name}.old."))
            os.replace(out, old / out.name)
            os.replace(final, out)
            shutil.rmtree(old)
        else:
            os.replace(final, out)
    except OSError as e:
        raise output_error(out, e) from None
    finally:
        bar.close()                     # the bar ends its line before any error is printed
        if scratch.exists():
            shutil.rmtree(scratch)
    return out


def set_config_dtype(config: Path, dtype: torch.dtype):
    """Set a copied HF config.json's dtype entry (`torch_dtype`, or `dtype` in newer
    transformers) to the merged weights' main dtype, so that from_pretrained(dtype="auto")
    loads the fine-tune in FT's dtype rather than BASE's. A config that is not JSON stays."""
    try:
        entries = json.loads(config.read_text())
    except ValueError:
        return
    keys = [k for k in ("torch_dtype", "dtype") if isinstance(entries, dict)
            and isinstance(entries.get(k), str)]
    if keys:
        entries.update(dict.fromkeys(keys, str(dtype).removeprefix("torch.")))
        config.write_text(json.dumps(entries, indent=2) + "\n")


def verify(base: str | Path, delta_path: str | Path, merged: str | Path,
           progress: bool = True) -> str:
    """Check a rebuilt checkpoint against BASE + Δ̂ recomputed here on the CPU, independently
    of `apply`: compressed matrices must agree to one rounding of their dtype (apply may have
    summed on a GPU, whose matmul rounds differently), every other tensor exactly."""
    from tqdm import tqdm

    delta = read_delta_file(delta_path)
    with contextlib.closing(CheckpointReader(base)) as base_r, \
            contextlib.closing(CheckpointReader(merged)) as merged_r:
        if sorted(base_r.names()) != sorted(merged_r.names()):
            raise DeltaComeError(f"{merged}: its tensor names differ from BASE {base}")
        with tqdm(base_r.names(), desc="verify", unit="tensor", disable=not progress) as names:
            worst = max((verify_tensor(name, base_r.get(name), merged_r.get(name), delta, merged)
                         for name in names), default=0.0)
        count = len(base_r.names())
    return (f"verified {count} tensors: {len(delta.matrices)} rebuilt within "
            f"{worst:.2f} ulp of BASE + Δ̂, {len(delta.carried)} carried and the rest equal")


def verify_tensor(name: str, w_base: torch.Tensor, w: torch.Tensor, delta: DeltaFile,
                  merged: str | Path) -> float:
    """One tensor of `verify`: how many ulps of its dtype a rebuilt matrix is off BASE + Δ̂
    (at most 1, else an error); every other tensor must be exact (0). Each must have FT's
    dtype as the delta file records it."""
    dtype = fine_tune_dtype(delta, name, w_base.dtype)
    if w.dtype != dtype or w.shape != w_base.shape:
        raise DeltaComeError(f"tensor {name}: {w.dtype} {tuple(w.shape)} in {merged}, "
                             f"{dtype} {tuple(w_base.shape)} expected")
    if name not in delta.matrices:
        if not torch.equal(w, delta.carried.get(name, w_base.to(dtype))):
            raise DeltaComeError(f"tensor {name}: differs from the "
                                 f"{'carried' if name in delta.carried else 'BASE'} tensor")
        return 0.0
    expected = w_base.float() + decompress_matrix(delta.matrices[name])
    ulp = torch.finfo(w.dtype).eps * expected.abs().clamp_min(torch.finfo(w.dtype).tiny)
    excess = float(((w.float() - expected).abs() / ulp).max())
    if excess > 1.0:
        raise DeltaComeError(f"tensor {name}: differs from BASE + Δ̂ by {excess:.2f} "
                             f"ulp of {w.dtype}")
    return excess


def info(delta_path: str | Path) -> str:
    """A human-readable summary of a delta file: one row per matrix, then totals."""
    d = read_delta_file(delta_path)
    rows = [f"{'matrix':<52}{'shape':>13}  {'bands (bits:rank)':<26}{'bytes':>11}{'ratio':>8}"
            f"{'rel.err':>9}"]
    total, fp16 = 0, 0
    for name, cm in d.matrices.items():
        nb, full = cm.nbytes(), 2 * cm.shape[0] * cm.shape[1]
        bands = ",".join(f"{b.bits}:{b.rank}" for b in cm.bands) or "(empty)"
        err = d.meta["matrices"][name].get("error", float("nan"))
        rows.append(f"{name:<52}{'x'.join(map(str, cm.shape)):>13}  {bands:<26}{nb:>11,}"
                    f"{nb / full:>8.4f}{err:>9.4f}")
        total, fp16 = total + nb, fp16 + full
    carried = sum(t.numel() * t.element_size() for t in d.carried.values())
    rows += [f"{len(d.matrices)} matrices: {total:,} bytes = {total / max(fp16, 1):.4f} of their "
             f"fp16 delta ({fp16:,} bytes); {len(d.carried)} carried tensors: {carried:,} bytes; "
             f"file {Path(delta_path).stat().st_size:,} bytes; group size {d.meta['group_size']}"]
    return "\n".join(rows)


# ----------------------------------------------------------------------------------------------
# A tiny example pair, so a new user can see the whole flow without downloading a model.


# Llama-family shapes: hidden, intermediate, attention heads, key/value heads, vocab, layers.
MODEL_SHAPES = {
    "tiny": (256, 688, 4, 1, 512, 2),
    "llama-2-7b": (4096, 11008, 32, 32, 32000, 32),
    "llama-3-8b": (4096, 14336, 32, 8, 128256, 32),
}


def block_shapes(hidden: int, kv: int, inter: int) -> dict[str, tuple[int, int]]:
    """(out, in) of the 7 projections of a Llama block; kv = key/value heads × head size."""
    return {"q": (hidden, hidden), "k": (kv, hidden), "v": (kv, hidden), "o": (hidden, hidden),
            "gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter)}


# The projection modules of a Llama block (HF names), by the keys of block_shapes.
LLAMA_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                 "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
                 "down": "mlp.down_proj"}


def make_example(directory: str | Path, model: str = "tiny", layers: int | None = None,
                 width: int | None = None, seed: int = 0, sharded: bool = True,
                 dtype: torch.dtype = torch.float16, device: str = "cpu",
                 progress: bool = False) -> tuple[Path, Path]:
    """Write BASE and FT checkpoints of a Llama-shaped model (MODEL_SHAPES; `layers` and
    `width` override its depth and hidden size) whose projection deltas have a long-tailed
    spectrum (synthetic_delta), norms and lm_head fine-tuned a little, the embedding unchanged.
    Sharded: one shard per layer plus one for the rest, written as generated, so memory holds
    one layer, never the model. Returns (base_dir, ft_dir)."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    hidden, inter, heads, kv_heads, vocab, n_layers = MODEL_SHAPES[model]
    if width is not None:
        hidden, inter = width, int(width * 2.6875)
    layers = n_layers if layers is None else layers
    shapes = block_shapes(hidden, hidden // heads * kv_heads, inter)
    gen = torch.Generator(device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device)

    def layer(i):                       # (base tensors, ft tensors) of block i, or the rest
        base, ft = {}, {}
        if i == layers:
            base["model.embed_tokens.weight"] = randn(vocab, hidden) * 0.02
            ft["model.embed_tokens.weight"] = base["model.embed_tokens.weight"]
            base["model.norm.weight"] = ft["model.norm.weight"] = torch.ones(hidden, device=device)
            base["lm_head.weight"] = randn(vocab, hidden) * 0.02
            ft["lm_head.weight"] = base["lm_head.weight"] + 0.001 * randn(vocab, hidden)
            return base, ft
        for kind, (o, n) in shapes.items():
            name = f"model.layers.{i}.{LLAMA_MODULES[kind]}.weight"
            base[name] = randn(o, n) / math.sqrt(n)
            ft[name] = base[name] + synthetic_delta(o, n, gen)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            name = f"model.layers.{i}.{norm}.weight"
            base[name] = torch.ones(hidden, device=device)
            ft[name] = base[name] + 0.01 * randn(hidden)
        return base, ft

    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
              "num_attention_heads": heads, "num_key_value_heads": kv_heads,
              "vocab_size": vocab, "torch_dtype": str(dtype).removeprefix("torch.")}
    directory = Path(directory)
    dirs = (directory / "base", directory / "ft")
    for d in dirs:
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps(config, indent=2))
    shards = [f"model-{j + 1:05d}-of-{layers + 1:05d}.safetensors" for j in range(layers + 1)]
    weight_map, size, whole = {}, 0, ({}, {})
    with tqdm(range(layers + 1), desc="example", unit="shard", disable=not progress) as bar:
        for i in bar:
            for d, tensors, everything in zip(dirs, layer(i), whole):
                tensors = {k: v.to(dtype).cpu().contiguous() for k, v in tensors.items()}
                if sharded:
                    save_file(tensors, str(d / shards[i]), {"format": "pt"})
                else:
                    everything.update(tensors)
            weight_map.update(dict.fromkeys(tensors, shards[i]))
            size += sum(t.numel() * t.element_size() for t in tensors.values())
    for d, everything in zip(dirs, whole):
        if sharded:
            (d / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": size}, "weight_map": weight_map}, indent=2))
        else:
            save_file(everything, str(d / "model.safetensors"), {"format": "pt"})
    return dirs


def synthetic_delta(out_f: int, in_f: int, gen: torch.Generator, alpha: float = 0.75,
                    scale: float = 0.02, noise: float = 0.02) -> torch.Tensor:
    """A delta with singular values σ_i ∝ (i+1)^-alpha over random orthonormal bases, plus
    white noise at `noise` of its norm: the long-tailed shape Delta-CoMe relies on. With
    alpha = 0.75 a 4096-wide delta has ~82 % of its energy in the top 16 singular values and
    ~92 % in the top 64, close to a real fine-tune's deltas (DESIGN.md section 5). Made on
    the generator's device; entries have mean |Δ| = scale/100."""
    k, device = min(out_f, in_f), gen.device
    U, _ = torch.linalg.qr(torch.randn(out_f, k, generator=gen, device=device))
    V, _ = torch.linalg.qr(torch.randn(in_f, k, generator=gen, device=device))
    S = (torch.arange(k, device=device) + 1.0) ** -alpha
    delta = (U * S) @ V.mT
    delta += noise * delta.norm() / math.sqrt(out_f * in_f) * torch.randn(
        out_f, in_f, generator=gen, device=device)
    return scale * delta / delta.abs().mean() * 0.01


# ----------------------------------------------------------------------------------------------
# CLI: a thin layer over Config. `python deltacome.py [compress] BASE FT OUT` compresses (the
# word is optional); apply / info / verify / example pick the other commands. -q and -h may
# come before the command word, every other option after it.

COMMANDS = ("compress", "apply", "info", "verify", "example")
LEADING_FLAGS = ("-q", "--quiet", "-h", "--help")


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line like every other error, exit status 2."""

    def error(self, message):
        self.exit(2, f"deltacome: error: {message} (see {self.prog} --help)\n")


def split_command(argv: list[str]) -> tuple[str, list[str]]:
    """(command, its arguments). The command is the first argument after any leading -q/-h,
    or compress when that argument is not a command word (`deltacome.py BASE FT OUT`)."""
    flags = list(itertools.takewhile(lambda a: a in LEADING_FLAGS, argv))
    rest = argv[len(flags):]
    if rest and rest[0] in COMMANDS:
        return rest[0], flags + rest[1:]
    misplaced = [a for a in rest if a in COMMANDS]
    if rest and rest[0].startswith("-") and misplaced:   # `--budget 1/32 compress ...`
        build_parser(misplaced[0]).error(f"only -q and -h may come before the command; put "
                                         f"{rest[0]} after the word {misplaced[0]}")
    return "compress", argv


def build_parser(command: str) -> argparse.ArgumentParser:
    p = Parser(
        prog=f"deltacome.py {command}",
        description=__doc__.split("\n\n")[0] + "\n\nCommands:\n"
        "  deltacome.py [compress] BASE FT OUT     compress FT's delta against BASE into OUT\n"
        "  deltacome.py apply BASE DELTA OUT       rebuild the fine-tune as a checkpoint\n"
        "  deltacome.py info DELTA                 summarize a delta file\n"
        "  deltacome.py verify BASE DELTA MERGED   check a rebuilt checkpoint against BASE + Δ̂\n"
        "  deltacome.py example DIR                make a tiny pair in DIR, compress and apply it\n"
        "\n-q (no progress bars) and -h may come before the command, other options after it.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Config()
    if command in ("compress", "example"):
        if command == "compress":
            p.add_argument("base", help="base checkpoint: .safetensors file or HF directory")
            p.add_argument("ft", help="fine-tuned checkpoint, same architecture as BASE")
            p.add_argument("out", help="output delta file (.safetensors), written atomically")
        else:
            p.add_argument("dir", help="directory for base/, ft/, delta.safetensors, merged/")
            p.add_argument("--model", choices=sorted(MODEL_SHAPES), default="tiny",
                           help="shapes of the generated pair (default tiny: 2 layers, "
                                "hidden 256); llama-2-7b is 2 × 13.5 GB in fp16")
            p.add_argument("--layers", type=int, help="override the number of layers")
            p.add_argument("--width", type=int, help="override the hidden size (intermediate "
                                                     "= 2.6875 × width, as Llama-2)")
            p.add_argument("--pair-only", action="store_true",
                           help="only write base/ and ft/, do not compress or apply")
        p.add_argument("--budget", type=fraction, default=d.budget,
                       help="bytes per matrix as a fraction of its fp16 delta, e.g. 1/16 "
                            "(default), 1/32, 0.05")
        p.add_argument("--method", default=d.method,
                       help="'greedy' (default: measured marginal-return allocation), 'paper' "
                            f"({PAPER_BANDS}), or a band spec BITS:RANK,... with RANK '*' = "
                            "what the budget leaves")
        p.add_argument("--widths", default=",".join(map(str, d.widths)),
                       help="candidate bit widths for greedy (default %(default)s)")
        p.add_argument("--group-size", type=int, default=d.group_size,
                       help="elements per quantization group, a multiple of 32 (default 128)")
        p.add_argument("--quantizer", choices=("mse", "minmax"), default=d.quantizer,
                       help="mse (default): per-group clipping search + least-squares fit; "
                            "minmax: plain asymmetric min-max")
        p.add_argument("--no-refit", action="store_true",
                       help="quantize U as is instead of refitting it to the quantized V")
        p.add_argument("--include", default=d.include,
                       help="regex on tensor names selecting the 2-D matrices to compress "
                            "(default: weights inside numbered transformer blocks)")
        p.add_argument("--svd", choices=("full", "gram", "lowrank"), default=d.svd,
                       help="gram (default: fp64 eigh of the smaller Gram matrix; same result "
                            "as full, compression 2.5x faster on an H100), full "
                            "(LAPACK/cuSOLVER SVD), lowrank (randomized, approximate tail)")
    if command in ("apply", "verify"):
        p.add_argument("base", help="the base checkpoint the delta was made against")
    if command in ("apply", "info", "verify"):
        p.add_argument("delta", help="delta file written by the compress command")
    if command == "apply":
        p.add_argument("out", help="output: a file if BASE is a file, else a directory")
    if command == "verify":
        p.add_argument("merged", help="the checkpoint `apply` rebuilt")
    if command in ("compress", "example", "apply"):
        p.add_argument("--device", default=d.device, help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bars (also accepted before the command)")
    return p


def fraction(text: str) -> float:
    try:
        num, _, den = text.partition("/")
        value = float(num) / float(den) if den else float(num)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not a fraction: {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"budget must be in (0, 1], got {text}")
    return value


def config_from_args(args) -> Config:
    try:
        widths = tuple(int(w) for w in args.widths.split(","))
    except ValueError:
        raise DeltaComeError(f"--widths: expected comma-separated integers, got {args.widths!r}")
    if not all(0 <= w <= 8 for w in widths):
        raise DeltaComeError(f"--widths: every width must be in 0..8, got {args.widths}")
    if not any(widths):
        raise DeltaComeError(f"--widths {args.widths}: give at least one width of 1..8 bits "
                             f"(0, dropping a vector, is always a candidate)")
    if args.group_size <= 0 or args.group_size % 32:
        raise DeltaComeError(f"--group-size must be a positive multiple of 32, got "
                             f"{args.group_size}")
    try:
        re.compile(args.include)
    except re.error as e:
        raise DeltaComeError(f"--include: bad regex ({e})") from None
    if args.method not in ("greedy", "paper"):
        parse_bands(args.method)
    return Config(budget=args.budget, method=args.method, widths=widths,
                  group_size=args.group_size, refit=not args.no_refit,
                  quantizer=args.quantizer, include=args.include,
                  device=args.device, svd=args.svd)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    if not argv:
        build_parser("compress").print_help(sys.stderr)
        return 2
    command, rest = split_command(argv)
    args = build_parser(command).parse_args(rest)
    try:
        if command == "compress":
            summary = compress(args.base, args.ft, args.out, config_from_args(args),
                               progress=not args.quiet)
            print(summary.table())
            print(f"wrote {args.out}")
        elif command == "apply":
            apply(args.base, args.delta, args.out, args.device, progress=not args.quiet)
            print(f"wrote {args.out}")
        elif command == "info":
            print(info(args.delta))
        elif command == "verify":
            print(verify(args.base, args.delta, args.merged, progress=not args.quiet))
        else:
            cfg = config_from_args(args)
            directory = Path(args.dir)
            directory.mkdir(parents=True, exist_ok=True)
            t = time.perf_counter()
            base, ft = make_example(directory, args.model, args.layers, args.width,
                                    device=str(pick_device(cfg.device)), progress=not args.quiet)
            print(f"wrote example pair {base} and {ft} in {time.perf_counter() - t:.1f}s")
            if args.pair_only:
                return 0
            summary = compress(base, ft, directory / "delta.safetensors", cfg,
                               progress=not args.quiet)
            print(summary.table())
            print(info(directory / "delta.safetensors"))
            t = time.perf_counter()
            apply(base, directory / "delta.safetensors", directory / "merged", cfg.device,
                  progress=not args.quiet)
            print(f"apply took {time.perf_counter() - t:.1f}s")
            print(f"wrote {directory / 'delta.safetensors'} and the rebuilt fine-tune "
                  f"{directory / 'merged'}")
    except DeltaComeError as e:
        print(f"deltacome: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        where = f"{e.filename}: " if e.filename is not None else ""
        print(f"deltacome: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
