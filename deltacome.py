"""Delta-CoMe: training-free mixed-precision compression of fine-tuned LLM weight deltas.

A fine-tune differs from its base by Δ = W_ft − W_base in every weight. The singular values
of Δ are long-tailed, so we write Δ = U diag(S) Vᵀ and quantize the singular vectors with
*mixed precision*: many bits for the few vectors of large S, 2 bits for the long middle,
nothing for the tail. No training. Calibration data is optional (--calib): with it, every
step fits the layer's output on real inputs instead of the weights.

The file reads top to bottom in the order of the method:

    checkpoints  -> read BASE and FT tensor by tensor (single file or sharded HF directory)
    delta, SVD   -> Δ in fp32, its singular triplets
    quantizer    -> asymmetric min-max per group of 128, dense bit packing
    allocation   -> greedy marginal-return bit widths under an exact byte budget (ours),
                    the paper's 8/3/2 preset, or a manual band spec
    compression  -> quantize V, refit U against the quantized V, quantize U; with calibration,
                    each step in the norm of the layer's outputs
    vocabulary   -> embeddings and lm_head: compressed, or their changed rows stored whole;
                    a resized vocabulary's added rows
    format       -> one .safetensors file, self-describing metadata, written atomically
    calibration  -> (--calib) the fine-tune run block by block: H = XᵀX of each layer's inputs
    apply / info -> rebuild W_base + Δ̂ as a checkpoint; summarize a delta file
    CLI

Public entry points: `compress_matrix` / `decompress_matrix` (one matrix), `compress`
(a checkpoint pair to a delta file), `apply` (back to a checkpoint), `read_delta_file`.

Usage:
    python deltacome.py BASE FT OUT                # compress at 1/16 of the fp16 delta
    python deltacome.py compress BASE FT OUT       # the same, the command named
    python deltacome.py BASE FT OUT --calib texts.jsonl   # fit to FT's inputs on these texts
    python deltacome.py apply BASE OUT.safetensors MERGED
    python deltacome.py info OUT.safetensors
    python deltacome.py verify BASE OUT.safetensors MERGED   # recheck MERGED against BASE + Δ̂
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
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

FORMAT_NAME = "deltacome"
FORMAT_VERSION = 2              # 2: vocabulary tensors, changed rows, side files, FT's dtypes
READ_VERSIONS = (1, 2)          # files written before version 2 still load
VOCAB_CHOICES = ("auto", "compress", "rows", "carry")   # Config.vocab: see "Vocabulary tensors"
MAX_GROUP_SIZE = 4096      # the largest group size --group-size and a file's metadata may hold

# The dtypes a matrix may have to be compressed: Δ is taken in fp32 and W_base + Δ̂ rounded
# back to them. Integer, bool and float8 tensors are carried exactly instead.
FLOAT_DTYPES = {torch.float64: "float64", torch.float32: "float32", torch.float16: "float16",
                torch.bfloat16: "bfloat16"}


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
    vocab: str = "auto"             # vocabulary tensors: "auto", "compress", "rows" or "carry"
    vocab_include: str = r"(embed_tokens|wte|word_embeddings|tok_embeddings|embed_in|lm_head|" \
                         r"embed_out)\.weight$"   # the vocabulary tensors: embeddings, lm_head
    device: str = "auto"            # "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...
    svd: str = "gram"               # "gram" (fp64 Gram eigh), "full" or "lowrank" (randomized)
    calib: str = ""                 # calibration file (token ids or texts); "" = calibration-free
    calib_tokens: int = 65536       # calibration tokens used at most
    calib_model: str = "ft"         # whose activations: "ft", or "base" (for comparison only)


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
            except (ValueError, KeyError, TypeError) as e:
                raise DeltaComeError(f"{index}: not a valid safetensors index ({e})") from None
            if not (isinstance(weight_map, dict)
                    and all(isinstance(v, str) for v in weight_map.values())):
                raise DeltaComeError(f"{index}: not a valid safetensors index ('weight_map' is "
                                     f"not an object of file names)")
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
    """Refuse NaN or Inf in a floating-point tensor (float8 is checked in fp32: isfinite lacks
    it)."""
    if t.is_floating_point() and not torch.isfinite(
            t if t.dtype in FLOAT_DTYPES else t.float()).all():
        raise DeltaComeError(f"{where}: tensor {name} contains NaN or Inf")


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """a and b hold the same dtype, shape and bytes (torch.equal lacks float8, and NaN ≠ NaN)."""
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(tensor_bytes(a), tensor_bytes(b)))


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


# With calibration, the error that matters is the layer's output error on its inputs X
# (tokens, in): ‖X(Δ − Δ̂)ᵀ‖²_F = tr((Δ − Δ̂) H (Δ − Δ̂)ᵀ) =: ‖Δ − Δ̂‖²_H, where H = XᵀX/tokens
# (in, in). H = I is the Frobenius norm, and every step below then reduces to the
# calibration-free one.


def damp(H: torch.Tensor, fraction: float = 0.01) -> torch.Tensor:
    """H + fraction·mean(diag H)·I, with never-active inputs (diag 0) given a unit diagonal:
    positive definite, so its Cholesky factor exists (GPTQ's 1 % damping)."""
    H = H.double().clone()
    diag = H.diagonal()
    diag[diag <= 0] = 1.0                     # an input that is always 0 costs nothing
    diag += fraction * diag.mean()
    return H


def svd_weighted(delta: torch.Tensor, H: torch.Tensor, rank: int, method: str = "gram"):
    """Best rank-r approximation of Δ (out, in) in the H-norm: U (out, r) orthonormal, S (r,),
    V (in, r) unit columns, with U diag(S) Vᵀ = U Uᵀ Δ. H must be positive definite (damp).

    With H = L Lᵀ, ‖E‖_H = ‖E L‖_F, so the optimum is Δ projected on the top left singular
    vectors of Δ L (activation-aware SVD, as SVD-LLM); V, S then follow from Δᵀ U. The
    allocation's weight of triplet i is its output energy S_i² v_iᵀ H v_i, the i-th singular
    value² of Δ L, descending as S is for H = I."""
    L = torch.linalg.cholesky(H.double()).to(delta.dtype)                 # (in, in)
    U, _, _ = svd_delta(delta @ L, rank, method)                          # (out, r)
    P = delta.mT @ U                                                      # (in, r) = V diag(S)
    S = P.norm(dim=0)                                                     # (r,)
    return U, S, P / S.clamp_min(torch.finfo(P.dtype).tiny)


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
    """Nearest code on the grid zero + scale·{0..levels}: (m, G, g) float codes. `levels` is a
    number or a tensor broadcasting against xg (a width per row)."""
    s = scale.float().unsqueeze(-1)
    q = torch.where(s > 0, (xg - zero.float().unsqueeze(-1)) / s, torch.zeros_like(xg))
    return q.round().clamp_(min=0).clamp_(max=levels)


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


def gptq_quantize(x: torch.Tensor, spans, H: torch.Tensor, group_size: int = 128,
                  search: bool = True) -> list[QuantizedVectors]:
    """x (m, n): m vectors, rows a:b of each span (bits, a, b) at `bits` -> one
    QuantizedVectors per span, minimizing Σ_rows (x − x̂) H (x − x̂)ᵀ instead of ‖x − x̂‖².

    GPTQ (Frantar et al., 2023), the element order fixed: element j of every row is rounded
    on its group's grid, and its rounding error, divided by the Cholesky factor's diagonal, is
    fed forward to the elements after it through row j of the upper Cholesky factor of H⁻¹
    (H positive definite: damp). A group's grid is fitted (quantize_groups) when its first
    element is reached, to the values the errors fed so far have moved it to. H ∝ I feeds
    nothing forward: quantize_vectors, code for code."""
    m, n = x.shape
    g = group_size
    C = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H.double())),
                              upper=True).to(torch.float32)             # (n, n), H⁻¹ = Cᵀ C
    x = x.float().clone()
    lowest, levels = torch.zeros(m, device=x.device), torch.empty(m, device=x.device)
    for bits, a, b in spans:
        levels[a:b] = 2**bits - 1                                       # (m,) per row
    codes = torch.empty(m, n, device=x.device)                          # float codes
    scales, zeros = [], []
    for start in range(0, n, g):
        stop = min(start + g, n)
        block = x[:, start:stop]                                        # (m, g) view into x
        grids = [quantize_groups(block[a:b], bits, g, search)[1:] for bits, a, b in spans]
        scale = torch.cat([s for s, _ in grids])[:, 0].float()           # (m,)
        zero = torch.cat([z for _, z in grids])[:, 0].float()
        step = torch.where(scale > 0, scale, math.inf)   # scale 0 rounds to code 0, as grid_codes
        err = torch.empty_like(block)                                    # (m, g)
        for j in range(stop - start):   # one column at a time, few ops: this loop is the cost
            column, c = block[:, j], C[start + j, start:stop]
            q = ((column - zero) / step).round_().clamp_(lowest, levels)    # (m,) as grid_codes
            codes[:, start + j] = q
            err[:, j] = e = (column - torch.addcmul(zero, q, scale)) / c[j]
            block[:, j + 1:].addr_(e, c[j + 1:], alpha=-1)
        x[:, stop:] -= err @ C[start:stop, stop:]
        scales.append(scale.half())
        zeros.append(zero.half())
    codes = codes.to(torch.uint8)
    scale, zero = torch.stack(scales, 1), torch.stack(zeros, 1)         # (m, G)
    return [QuantizedVectors(pack_codes(codes[a:b], bits), scale[a:b], zero[a:b], bits, n, g)
            for bits, a, b in spans]


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
                  search: bool = True, H: torch.Tensor | None = None) -> torch.Tensor:
    """U (out, r), V (in, r) unit columns -> ε (r, len(widths)) fp64, ε_i(b) as above.

    With H (in, in), ε_i(b) is measured in the H-norm of the calibration section, relative to
    the vector pair's own: ‖û_i v̂_iᵀ − u_i v_iᵀ‖²_H / ‖u_i v_iᵀ‖²_H, still 1 at 0 bits."""
    def dot(a, b):                              # row-wise a·b, or a H bᵀ with calibration
        return (a * b).sum(1) if H is None else ((a @ H.double()) * b).sum(1)
    eps = []
    for bits in widths:
        if bits == 0:
            eps.append(torch.ones(U.shape[1], dtype=torch.float64, device=U.device))
            continue
        u, v = U.mT.double(), V.mT.double()                                  # (r, out), (r, in)
        uq = dequantize_vectors(quantize_vectors(U.mT, bits, group_size, search)).double()
        vq = dequantize_vectors(quantize_vectors(V.mT, bits, group_size, search)).double()
        # ‖ûv̂ᵀ − uvᵀ‖² = ‖û‖²‖v̂‖² − 2(û·u)(v̂·v) + ‖u‖²‖v‖², the v products in the H-norm
        e = ((uq * uq).sum(1) * dot(vq, vq) - 2 * (uq * u).sum(1) * dot(vq, v)
             + (u * u).sum(1) * dot(v, v))
        if H is not None:
            e = e / ((u * u).sum(1) * dot(v, v)).clamp_min(torch.finfo(torch.float64).tiny)
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
            per_byte = gain / extra if extra > 0 else math.inf     # 3 and 4 bits cost alike
            if gain > 0 and (best is None or per_byte > best[0]):
                best = (per_byte, t)
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


def choose_widths(delta: torch.Tensor, cfg: Config, H: torch.Tensor | None = None):
    """SVD of Δ and a bit width per kept singular triplet, by cfg.method under cfg.budget.
    With H (damped), the SVD and greedy's error model are those of the H-norm."""
    out_f, in_f = delta.shape
    g = cfg.group_size
    budget = budget_bytes(out_f, in_f, cfg.budget)
    none = [], delta.new_zeros(out_f, 0), delta.new_zeros(0), delta.new_zeros(in_f, 0)
    if not delta.any():
        return none

    def svd(rank):
        return svd_delta(delta, rank, cfg.svd) if H is None else \
            svd_weighted(delta, H, rank, cfg.svd)
    if cfg.method == "greedy":
        candidates = sorted({0, *cfg.widths})
        if candidates == [0]:
            raise DeltaComeError(f"widths {tuple(cfg.widths)}: no width of 1..8 bits to store a "
                                 f"vector at (0, dropping it, is always a candidate)")
        costs = [vector_bytes(out_f, in_f, b, g) for b in candidates]
        cheapest = min(costs[1:], default=budget + 1)
        max_rank = min(budget // cheapest, out_f, in_f)
        widths = []
        if max_rank > 0:
            U, S, V = svd(max_rank)
            eps = vector_errors(U, V, candidates, g, cfg.quantizer == "mse", H)
            energy = S if H is None else S * ((V.mT.double() @ H) * V.mT).sum(1).sqrt()
            widths = [b for b in allocate_bits(energy, eps, costs, candidates, budget) if b > 0]
    else:
        spec = parse_bands(PAPER_BANDS if cfg.method == "paper" else cfg.method)
        cheapest = min(vector_bytes(out_f, in_f, bits, g) for bits, _ in spec)
        widths = bands_to_widths(spec, out_f, in_f, budget, g)
        if widths:
            U, S, V = svd(len(widths))
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


def compress_matrix(delta: torch.Tensor, cfg: Config = Config(), dtype: str = "float32",
                    H: torch.Tensor | None = None) -> CompressedMatrix:
    """Δ (out, in) fp32 -> CompressedMatrix whose stored bytes fit cfg.budget.

    H (in, in), the Gram XᵀX/tokens of the layer's calibration inputs, turns the objective
    from ‖Δ − Δ̂‖ into the output error ‖X(Δ − Δ̂)ᵀ‖ at every step: the SVD, the allocation's
    error model, V's quantization (GPTQ) and U's refit. H = I gives the calibration-free
    result (to rounding)."""
    assert delta.ndim == 2, f"delta must be 2-D, got {tuple(delta.shape)}"
    if H is not None:
        assert H.shape == (delta.shape[1],) * 2, \
            f"H must be (in, in) = {(delta.shape[1],) * 2}, got {tuple(H.shape)}"
        H = damp(H).to(delta.device)
    widths, U, S, V = choose_widths(delta.float(), cfg, H)
    g, r, search = cfg.group_size, len(widths), cfg.quantizer == "mse"
    spans = bands_of(widths)
    U, S, V = U[:, :r], S[:r], V[:, :r]
    V_q = quantize_v(V, spans, g, search, H)
    L = refit_u(delta.float(), V_q, H) if cfg.refit and r > 0 else U * S    # (out, r)
    S_new = L.norm(dim=0)                                                     # (r,)
    U_unit = L / S_new.clamp_min(torch.finfo(torch.float32).tiny)
    bands = [Band(bits, S_new[a:b].contiguous(),
                  quantize_vectors(U_unit[:, a:b].mT, bits, g, search), vq)
             for (bits, a, b), vq in zip(spans, V_q)]
    return CompressedMatrix(tuple(delta.shape), dtype, bands)


def quantize_v(V: torch.Tensor, spans, group_size: int, search: bool,
               H: torch.Tensor | None = None) -> list[QuantizedVectors]:
    """V (in, r) -> one QuantizedVectors per band: round to nearest, or GPTQ in the H-norm,
    where V meets the inputs (x V̂ is the first product of the kernel)."""
    if H is None:
        return [quantize_vectors(V[:, a:b].mT, bits, group_size, search) for bits, a, b in spans]
    return gptq_quantize(V.mT, spans, H, group_size, search)


def refit_u(delta: torch.Tensor, V_q: list[QuantizedVectors],
            H: torch.Tensor | None = None) -> torch.Tensor:
    """The left factor L (out, r) that best fits Δ for the quantized V̂: L = Δ H V̂ (V̂ᵀ H V̂)⁻¹
    (H = I without calibration), so Û absorbs V's quantization error. L's column norms become
    the new S and its normalized columns are quantized as U."""
    V_hat = torch.cat([dequantize_vectors(q) for q in V_q], 0).mT          # (in, r)
    HV = V_hat if H is None else H.to(V_hat.dtype) @ V_hat                  # (in, r)
    gram = V_hat.mT @ HV                                                    # (r, r)
    gram += 1e-6 * gram.diagonal().mean() * torch.eye(gram.shape[0], device=gram.device)
    return torch.linalg.solve(gram, (delta @ HV).mT).mT                    # (out, r)


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
# Vocabulary tensors: the token embeddings and lm_head (Config.vocab_include). They are large
# (SmolLM2-135M: 49152 × 576 in fp16 is 56.6 MB, more than all its projections at 1/16), and a
# fine-tune changes them in one of two ways. An untied embedding trained with AdamW and no
# weight decay keeps the rows of tokens never seen in training exactly: its changed rows,
# stored whole, are exact and few. A tied embedding is also the output head, whose softmax
# gives every row a gradient at every step, so every row changes: its delta is compressed
# like a projection, at the same budget (a row of Û diag(S) V̂ᵀ is cheap to rebuild per
# token). Config.vocab "auto" takes, per tensor, the changed rows where they take no more
# bytes than the compressed matrix may, else the compressed matrix; "compress", "rows" and
# "carry" (the whole tensor, as any other) force one. A resized vocabulary (tokens added:
# FT has more rows than BASE) stores its new rows whole, and its shared rows as above.


@dataclass
class RowDelta:
    """Rows of FT's tensor stored whole: rows that changed, and rows past BASE's."""
    shape: tuple[int, ...]    # FT's shape; rows from base_rows on are new (added tokens)
    base_rows: int            # BASE's rows
    index: torch.Tensor       # (K,) int64, ascending
    values: torch.Tensor      # (K, *shape[1:]) FT's rows, in FT's dtype

    def nbytes(self) -> int:
        """Stored bytes: an int32 index entry and the row's values, per row."""
        return 4 * self.index.numel() + self.values.numel() * self.values.element_size()


def changed_rows(delta: torch.Tensor) -> torch.Tensor:
    """Δ (rows, ...) -> (K,) int64 indices of its nonzero rows (dim 0), ascending."""
    return delta.reshape(delta.shape[0], -1).ne(0).any(1).nonzero().squeeze(1)


def rows_bytes(w: torch.Tensor, count: int) -> int:
    """Bytes `count` rows of w take stored whole (RowDelta.nbytes)."""
    return count * (4 + math.prod(w.shape[1:]) * w.element_size())


def vocab_storage(shared: torch.Tensor, changed: int, cfg: Config) -> str:
    """How the shared rows of a vocabulary tensor (FT's rows that BASE has too) are stored:
    cfg.vocab, with "auto" resolved by bytes: "rows" where `changed` rows take no more than
    the compressed matrix's budget (exact, and no larger), else "compress"."""
    if cfg.vocab != "auto":
        return cfg.vocab
    fits = rows_bytes(shared, changed) <= budget_bytes(*shared.shape[:2], cfg.budget)
    return "rows" if shared.ndim == 2 and fits else "compress"


def check_resizable(name: str, w_base: torch.Tensor, w_ft: torch.Tensor, vocab: bool):
    """Shapes that differ between BASE and FT are an error, but for a vocabulary tensor that
    gained rows (tokens added to the vocabulary)."""
    grown = (w_ft.ndim == w_base.ndim >= 1 and w_ft.shape[1:] == w_base.shape[1:]
             and w_ft.shape[0] > w_base.shape[0])
    if not (vocab and grown):
        why = "a vocabulary may grow, not shrink" if vocab and w_ft.ndim == w_base.ndim \
            and w_ft.shape[1:] == w_base.shape[1:] else "different architectures?"
        raise DeltaComeError(f"tensor {name}: shape {tuple(w_base.shape)} in BASE but "
                             f"{tuple(w_ft.shape)} in FT ({why})")


def place_rows(w: torch.Tensor, rows: RowDelta) -> torch.Tensor:
    """BASE's tensor w (base_rows, ...) (or W_base + Δ̂) -> FT's shape, rows.index replaced by
    FT's rows; in w's dtype."""
    out = w.new_zeros(rows.shape)
    out[: rows.base_rows] = w
    out[rows.index.to(w.device)] = rows.values.to(w.device, w.dtype)
    return out


def probe(w: torch.Tensor) -> list[float]:
    """Four values of w at fixed positions: a fingerprint of the base a delta was made against
    (files of different bases, or a model that is not the base, differ there)."""
    flat = w.reshape(-1)
    n = flat.numel()
    return [float(flat[i * (n - 1) // 3]) for i in range(4)] if n else []


def probes_match(a: list[float], b: list[float], dtype: torch.dtype) -> bool:
    """Two probes of one tensor (deltacome.probe) agree up to a rounding to `dtype` or bf16,
    whichever is coarser: what loading one checkpoint in another dtype changes."""
    if not (dtype.is_floating_point and torch.finfo(dtype).bits <= 32):
        return a == b
    tol = max(torch.finfo(dtype).eps, 2.0**-7)
    return len(a) == len(b) and all(abs(x - y) <= tol * max(abs(x), abs(y)) + 1e-30
                                    for x, y in zip(a, b))


# Config and tokenizer files of a fine-tune, stored where they differ from BASE's (a resized
# vocabulary has FT's vocab_size and added tokens in them), so that `apply` writes FT's.
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt",
              "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json")


def changed_side_files(base: Path, ft: Path) -> dict[str, bytes]:
    """{name: FT's bytes} of the SIDE_FILES in FT's directory that BASE lacks or has
    different (none when FT is a single file)."""
    if not (ft.is_dir() and base.is_dir()):
        return {}
    out = {}
    for name in SIDE_FILES:
        mine, theirs = ft / name, base / name
        if mine.is_file() and not (theirs.is_file() and theirs.read_bytes() == mine.read_bytes()):
            out[name] = mine.read_bytes()
    return out


# ----------------------------------------------------------------------------------------------
# File format. One .safetensors file. For a compressed matrix NAME with bands k = 0, 1, ...:
#   NAME.band{k}.S             (r_k,)                fp32
#   NAME.band{k}.U.codes       (r_k, ⌈out/(32/c)⌉)   int32   packed rows, one per vector u_i
#   NAME.band{k}.U.scale/zero  (r_k, ⌈out/g⌉)        fp16
#   NAME.band{k}.V.*           same with `in` in place of `out`
# Compressed vocabulary tensors (embeddings, lm_head) are stored the same way. Since version 2:
#   rows.NAME.index            (K,)                  int32   ascending rows of FT's tensor
#   rows.NAME.values           (K, *shape[1:])       FT's dtype   those rows of FT, bit-exact
#                              (a vocabulary tensor's changed rows, and the rows FT added)
#   file.NAME                  (bytes,)              uint8   a config or tokenizer file of FT
# Tensors that are not compressed and differ from BASE are stored as `carry.NAME`, copied
# bit-exact from FT; the ones equal to BASE are not stored (apply takes BASE's). The metadata
# "deltacome" entry is JSON: format, version, group_size, config, per matrix its shape, FT's
# dtype, bands [[bits, rank], ...], relative error and role ("projection" or "vocab"); the list
# of carried tensors; and since version 2: per rows entry FT's shape, BASE's row count, the
# row count stored and the dtype; the list of files; `dtypes`, FT's dtype of every tensor
# whose dtype differs from BASE's; whole_fp16_bytes (2 bytes per element of every FT tensor:
# the fp16 delta of the whole fine-tune, the denominator of the whole-file ratio); and
# base_probes, four values of every BASE tensor (`probe`), which tell files of different bases
# apart. Version-1 files (none of these; their fine-tunes had BASE's dtypes) still load.
# Everything is vector-major and contiguous, so a kernel reads a band in coalesced rows.

DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
          torch.bfloat16: "BF16", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
          torch.uint64: "U64", torch.uint32: "U32", torch.uint16: "U16", torch.uint8: "U8",
          torch.bool: "BOOL"}


def dtype_name(dtype: torch.dtype, name: str) -> str:
    """The safetensors name of a dtype; `name` is the tensor's, for the error."""
    if dtype not in DTYPES:
        raise DeltaComeError(f"tensor {name}: dtype {dtype} has no safetensors name here")
    return DTYPES[dtype]


def tensor_bytes(t: torch.Tensor) -> torch.Tensor:
    """A tensor's raw bytes, (numel · element size,) uint8, on the CPU (a view where it can)."""
    return t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)


def tensor_checksum(name: str, t: torch.Tensor) -> str:
    """CRC-32 of a tensor's dtype name, shape and bytes, as 8 hex digits. CRC-32 detects
    every error confined to 32 consecutive bits: one flipped bit or changed byte anywhere in
    them always gives a different checksum."""
    crc = zlib.crc32(f"{dtype_name(t.dtype, name)}{list(t.shape)}".encode())
    return f"{zlib.crc32(tensor_bytes(t).numpy(), crc):08x}"


def text_checksum(text: str) -> str:
    return f"{zlib.crc32(text.encode()):08x}"


class SafetensorsWriter:
    """Writes a .safetensors file tensor by tensor without holding them all in memory.

    Data goes to a scratch file as it comes; `finish` writes the header, streams the data
    after it, and renames into place, so OUT is never seen half-written. With
    checksums=True, `checksums` maps every tensor name to its tensor_checksum.
    """

    def __init__(self, path: str | Path, checksums: bool = False):
        self.path = Path(path)
        self.header, self.offset = {}, 0
        self.checksums = {} if checksums else None
        self._data = tempfile.TemporaryFile(dir=self.path.parent)

    def add(self, name: str, tensor: torch.Tensor):
        assert name not in self.header, f"duplicate tensor {name}"
        tensor = tensor.detach().to("cpu")
        raw = tensor_bytes(tensor).numpy()
        self.header[name] = {"dtype": dtype_name(tensor.dtype, name), "shape": list(tensor.shape),
                             "data_offsets": [self.offset, self.offset + len(raw)]}
        if self.checksums is not None:
            self.checksums[name] = tensor_checksum(name, tensor)
        self._data.write(raw.data)
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
    """A delta file read back: its compressed matrices, carried tensors, metadata, and (since
    version 2) its row deltas and FT's side files."""
    matrices: dict[str, CompressedMatrix]
    carried: dict[str, torch.Tensor]
    meta: dict
    rows: dict[str, RowDelta] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)

    def role(self, name: str) -> str:
        """"projection" or "vocab": what a compressed matrix is (version 1: projections)."""
        return self.meta["matrices"][name].get("role", "projection")


# ----------------------------------------------------------------------------------------------
# Reading a delta file back. Nothing in a file is taken on trust: before any of it is used,
# `read_delta_file` checks
#   1. the metadata: JSON with the keys and types `compress` writes (check_meta);
#   2. the tensors: exactly those the metadata implies, each with the shape and dtype that
#      its out, in, rank, bits and group size give (expected_tensors: a function per kind);
#   3. that S, scales, zeros and carried tensors are finite;
#   4. the checksums, where the file has them (every file written since they were added):
#      CRC-32 of the metadata text and of each tensor (tensor_checksum). Only they see a
#      flipped bit inside packed codes, where any bit pattern is a valid code. Files written
#      before them get checks 1-3.
# What a file cannot know, the shapes and dtypes BASE gives its tensors, is checked where
# BASE (check_against_base) or the model (kernel.patch_model) is at hand.

META_CHECKSUM = f"{FORMAT_NAME}.crc32"      # metadata key: text_checksum of the JSON entry


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def short(x) -> str:
    """repr(x) cut to 40 characters, for an error message about a value read from a file."""
    r = repr(x)
    return r if len(r) <= 40 else r[:37] + "..."


def check_meta(meta, where) -> dict:
    """The parsed 'deltacome' metadata entry -> itself, if it has the keys and types `compress`
    writes; else a DeltaComeError naming the first thing wrong."""
    def need(ok: bool, what: str):
        if not ok:
            raise DeltaComeError(f"{where}: corrupt metadata: {what}")

    need(isinstance(meta, dict), f"not a JSON object but {short(meta)}")
    need(meta.get("format") == FORMAT_NAME, f"'format' is {short(meta.get('format'))}, "
                                            f"not {FORMAT_NAME!r}")
    need(is_int(meta.get("version")), f"'version' is {short(meta.get('version'))}, "
                                      f"not an integer")
    if meta["version"] not in READ_VERSIONS:
        raise DeltaComeError(f"{where}: format version {meta['version']} is not supported "
                             f"(this reader knows {', '.join(map(str, READ_VERSIONS))})")
    g = meta.get("group_size")
    need(valid_group_size(g),
         f"'group_size' is {short(g)}, not a multiple of 32 in 32..{MAX_GROUP_SIZE}")
    need(isinstance(meta.get("config", {}), dict), "'config' is not a JSON object")
    matrices, carried = meta.get("matrices"), meta.get("carried")
    need(isinstance(matrices, dict), "'matrices' is not a JSON object")
    for name, m in matrices.items():
        check_matrix_meta(m, lambda ok, what: need(ok, f"matrix {name}: {what}"))
    need(isinstance(carried, list) and all(isinstance(n, str) for n in carried)
         and len(set(carried)) == len(carried), "'carried' is not a list of distinct names")
    need(not set(carried) & set(matrices), "a tensor is listed as compressed and as carried")
    rows, files = meta.get("rows", {}), meta.get("files", [])
    need(isinstance(rows, dict), "'rows' is not a JSON object")
    for name, r in rows.items():
        check_rows_meta(r, lambda ok, what: need(ok, f"rows of {name}: {what}"))
    need(not set(carried) & set(rows), "a tensor is listed with stored rows and as carried")
    need(isinstance(files, list) and all(f in SIDE_FILES for f in files)
         and len(set(files)) == len(files),
         f"'files' is not a list of distinct config or tokenizer file names "
         f"({', '.join(SIDE_FILES)})")
    dtypes = meta.get("dtypes", {})
    need(isinstance(dtypes, dict) and all(v in FLOAT_DTYPES.values() for v in dtypes.values()),
         f"'dtypes' is not a JSON object of float dtype names "
         f"({', '.join(FLOAT_DTYPES.values())})")
    for key in ("whole_fp16_bytes", "unchanged"):
        need(is_int(meta.get(key, 0)) and meta.get(key, 0) >= 0,
             f"'{key}' is {short(meta.get(key))}, not a count")
    sums = meta.get("checksums", {})
    need(isinstance(sums, dict) and all(isinstance(v, str) and re.fullmatch("[0-9a-f]{8}", v)
                                        for v in sums.values()),
         "'checksums' is not a JSON object of 8-hex-digit strings")
    return meta


def check_matrix_meta(m, need):
    """One entry of 'matrices': shape [out, in], a float dtype, bands [[bits, rank], ...]."""
    need(isinstance(m, dict), "not a JSON object")
    shape, bands, error = m.get("shape"), m.get("bands"), m.get("error", 0.0)
    need(isinstance(shape, list) and len(shape) == 2 and all(is_int(n) and n >= 0 for n in shape),
         f"'shape' is {short(shape)}, not [out, in]")
    need(m.get("dtype") in FLOAT_DTYPES.values(),
         f"'dtype' is {short(m.get('dtype'))}, not one of {', '.join(FLOAT_DTYPES.values())}")
    need(isinstance(bands, list) and all(
        isinstance(b, list) and len(b) == 2 and is_int(b[0]) and 1 <= b[0] <= 8
        and is_int(b[1]) and b[1] >= 0 for b in bands),
         "'bands' is not a list of [bits 1..8, rank ≥ 0]")
    need(sum(rank for _, rank in bands) <= min(shape),
         f"its ranks add up to more than min(out, in) = {min(shape)}")
    need(isinstance(error, (int, float)) and not isinstance(error, bool), "'error' is not a number")
    need(m.get("role", "projection") in ("projection", "vocab"),
         f"'role' is {short(m.get('role'))}, not 'projection' or 'vocab'")


def check_rows_meta(r, need):
    """One entry of 'rows': FT's shape, BASE's row count, the values' dtype and row count."""
    need(isinstance(r, dict), "not a JSON object")
    shape, base_rows, count = r.get("shape"), r.get("base_rows"), r.get("count")
    need(isinstance(shape, list) and len(shape) >= 1 and all(is_int(n) and n >= 0
                                                             for n in shape),
         f"'shape' is {short(shape)}, not a list of sizes")
    need(is_int(base_rows) and 0 < base_rows <= shape[0],
         f"'base_rows' is {short(base_rows)}, not in 1..{shape[0]}")
    need(is_int(count) and shape[0] - base_rows <= count <= shape[0],
         f"'count' is {short(count)}, not in {shape[0] - base_rows}..{shape[0]}")
    need(r.get("dtype") in FLOAT_DTYPES.values(),
         f"'dtype' is {short(r.get('dtype'))}, not one of {', '.join(FLOAT_DTYPES.values())}")


def matrix_tensors(name: str, m: dict, group_size: int) -> dict:
    """The tensors of one compressed matrix in the file: tensor name -> (shape, dtype)."""
    out_f, in_f = m["shape"]
    specs = {}
    for k, (bits, rank) in enumerate(m["bands"]):
        p = f"{name}.band{k}"
        specs[f"{p}.S"] = ((rank,), torch.float32)
        for side, n in (("U", out_f), ("V", in_f)):
            words = -(-n // (32 // container_bits(bits)))
            specs[f"{p}.{side}.codes"] = ((rank, words), torch.int32)
            specs[f"{p}.{side}.scale"] = ((rank, -(-n // group_size)), torch.float16)
            specs[f"{p}.{side}.zero"] = ((rank, -(-n // group_size)), torch.float16)
    return specs


def expected_tensors(meta: dict) -> dict:
    """Every tensor a file's metadata implies: name -> (shape, dtype), or None where the file
    does not fix them (a carried tensor is whatever FT held there)."""
    specs = {}
    for name, m in meta["matrices"].items():
        specs.update(matrix_tensors(name, m, meta["group_size"]))
    specs.update({f"carry.{name}": None for name in meta["carried"]})
    dtypes = {v: k for k, v in FLOAT_DTYPES.items()}
    for name, r in meta.get("rows", {}).items():
        specs[f"rows.{name}.index"] = ((r["count"],), torch.int32)
        specs[f"rows.{name}.values"] = ((r["count"], *r["shape"][1:]), dtypes[r["dtype"]])
    specs.update({f"file.{name}": None for name in meta.get("files", [])})
    return specs


def read_delta_meta(metadata: dict, path) -> dict:
    """A file's safetensors metadata -> its checked 'deltacome' entry (checks 1 and 4 above)."""
    raw = metadata.get(FORMAT_NAME)
    if raw is None:
        raise DeltaComeError(f"{path}: not a deltacome file (no '{FORMAT_NAME}' metadata)")
    crc = metadata.get(META_CHECKSUM)
    if crc is not None and crc != text_checksum(raw):
        raise DeltaComeError(f"{path}: the metadata fails its checksum (the file is corrupt)")
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError):
        raise DeltaComeError(f"{path}: corrupt metadata: not JSON") from None
    check_meta(meta, path)
    if "checksums" in meta and crc is None:
        raise DeltaComeError(f"{path}: corrupt metadata: tensor checksums but no "
                             f"'{META_CHECKSUM}'")
    return meta


def check_tensor(name: str, t: torch.Tensor, spec, checksum: str | None, path):
    """One tensor read from a delta file: its shape and dtype against `spec` (if not None),
    finite if floating point, and its checksum (if the file has one)."""
    if spec is not None and (tuple(t.shape), t.dtype) != spec:
        raise DeltaComeError(f"{path}: tensor {name} is {dtype_name(t.dtype, name)} "
                             f"{tuple(t.shape)}, the metadata implies "
                             f"{dtype_name(spec[1], name)} {spec[0]}")
    check_finite(name, t, str(path))
    if checksum is not None and tensor_checksum(name, t) != checksum:
        raise DeltaComeError(f"{path}: tensor {name} fails its checksum (the file is corrupt)")


def read_delta_file(path: str | Path, device: str = "cpu") -> DeltaFile:
    """Load a delta file written by `compress`, the inverse of the format above; a file that
    fails any check above is refused with a DeltaComeError before any of it is returned."""
    path = Path(path)
    with open_safetensors(path) as f:
        meta = read_delta_meta(f.metadata() or {}, path)
        specs, names = expected_tensors(meta), set(f.keys())
        if names != set(specs):
            odd = sorted(names ^ set(specs))[0]
            raise DeltaComeError(f"{path}: tensor {odd} " + ("is in the file but not in its "
                                 "metadata" if odd in names else "is missing from the file"))
        sums = meta.get("checksums")
        if sums is not None and set(sums) != names:
            raise DeltaComeError(f"{path}: corrupt metadata: the checksums do not name the "
                                 f"file's tensors")
        tensors = {}
        for name in sorted(names):
            try:
                tensors[name] = f.get_tensor(name)
            except Exception as e:     # safetensors' own error types
                raise DeltaComeError(f"{path}: cannot read tensor {name} ({e})") from None
            check_tensor(name, tensors[name], specs[name], (sums or {}).get(name), path)
    g = meta["group_size"]

    def qv(p: str, bits: int, n: int) -> QuantizedVectors:
        return QuantizedVectors(*(tensors[f"{p}.{part}"].to(device)
                                  for part in ("codes", "scale", "zero")), bits, n, g)
    matrices = {}
    for name, m in meta["matrices"].items():
        out_f, in_f = m["shape"]
        bands = []
        for k, (bits, _) in enumerate(m["bands"]):
            p = f"{name}.band{k}"
            bands.append(Band(bits, tensors[f"{p}.S"].to(device), qv(f"{p}.U", bits, out_f),
                              qv(f"{p}.V", bits, in_f)))
        matrices[name] = CompressedMatrix((out_f, in_f), m["dtype"], bands)
    carried = {name: tensors[f"carry.{name}"].to(device) for name in meta["carried"]}
    rows = {}
    for name, entry in meta.get("rows", {}).items():
        rows[name] = RowDelta(tuple(entry["shape"]), entry["base_rows"],
                              tensors[f"rows.{name}.index"].long().to(device),
                              tensors[f"rows.{name}.values"].to(device))
        check_rows(name, rows[name], path)
    files = {}
    for name in meta.get("files", []):
        t = tensors[f"file.{name}"]
        if t.dtype != torch.uint8 or t.ndim != 1:
            raise DeltaComeError(f"{path}: tensor file.{name} is {t.dtype} {tuple(t.shape)}, "
                                 f"not the bytes of a file")
        files[name] = t.numpy().tobytes()
    return DeltaFile(matrices, carried, meta, rows, files)


def check_rows(name: str, rows: RowDelta, source) -> None:
    """A row delta read from `source` (its tensors' shapes and dtypes already checked against
    the metadata) is whole: ascending rows inside FT's shape, every row FT added present.
    One-line DeltaComeError."""
    where = f"{source}: rows of {name}"
    n, index = rows.shape[0], rows.index
    if index.numel() and (int(index[0]) < 0 or int(index[-1]) >= n
                          or not bool((index[1:] > index[:-1]).all())):
        raise DeltaComeError(f"{where}: the index is not ascending inside 0..{n - 1}")
    if int((index >= rows.base_rows).sum()) != n - rows.base_rows:
        raise DeltaComeError(f"{where}: rows {rows.base_rows}..{n - 1} (added) are not all stored")


def checkpoint_layout(files: dict[str, Path]) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, safetensors dtype name) of every tensor of a checkpoint, from its files'
    headers alone (checkpoint_files gives `files`)."""
    layout = {}
    for file in sorted(set(files.values())):
        with open_safetensors(file) as f:
            for name in f.keys():
                piece = f.get_slice(name)
                layout[name] = (tuple(piece.get_shape()), piece.get_dtype())
    return layout


def check_against_base(delta: DeltaFile, layout: dict, delta_path, base):
    """Refuse a delta that does not fit BASE (layout: checkpoint_layout of BASE): a tensor BASE
    lacks, a matrix of another shape or not floating point in BASE, a carried tensor of
    another shape or dtype."""
    floats = {DTYPES[d] for d in FLOAT_DTYPES}
    for name in [*delta.matrices, *delta.carried, *delta.rows]:
        if name not in layout:
            raise DeltaComeError(f"{delta_path}: tensor {name} is not in BASE {base} "
                                 f"(a delta made against another base?)")
    for name, cm in delta.matrices.items():
        shape, dtype = layout[name]
        if shape != cm.shape:
            raise DeltaComeError(f"tensor {name}: shape {shape} in BASE but {cm.shape} in the "
                                 f"delta file")
        if dtype not in floats:
            raise DeltaComeError(f"tensor {name}: {dtype} in BASE, not a floating-point matrix "
                                 f"a delta can be added to")
    for name, rows in delta.rows.items():
        shape, dtype = layout[name]
        if shape[:1] != (rows.base_rows,) or shape[1:] != tuple(rows.shape[1:]):
            raise DeltaComeError(f"tensor {name}: shape {shape} in BASE, but the delta file's "
                                 f"rows extend one of {rows.base_rows} rows of "
                                 f"{tuple(rows.shape[1:])}")
        if dtype not in floats:
            raise DeltaComeError(f"tensor {name}: {dtype} in BASE, not a floating-point tensor "
                                 f"whose rows can be replaced")
    vocab = re.compile(delta.meta["config"].get("vocab_include", Config.vocab_include))
    for name, t in delta.carried.items():
        shape, dtype = layout[name]
        grown = (vocab.search(name) is not None and t.ndim == len(shape) >= 1
                 and tuple(t.shape[1:]) == shape[1:] and t.shape[0] > shape[0])  # added tokens
        recorded = delta.meta.get("dtypes", {}).get(name)              # FT's, where not BASE's
        dtype_ok = dtype_name(t.dtype, name) == dtype or \
            str(t.dtype).removeprefix("torch.") == recorded
        if not (dtype_ok and (tuple(t.shape) == shape or grown)):
            raise DeltaComeError(f"carried tensor {name}: {dtype_name(t.dtype, name)} "
                                 f"{tuple(t.shape)} in {delta_path}, {layout[name][1]} "
                                 f"{layout[name][0]} in BASE")


# ----------------------------------------------------------------------------------------------
# Calibration (--calib): the Gram H = XᵀX/tokens of the inputs X of every compressed matrix,
# from the fine-tune itself run on calibration tokens, block by block as GPTQ does. The
# embeddings run once and a stand-in for block 0 catches what it receives (hidden states and
# the keyword arguments the model passes: position embeddings, masks); then each block in
# turn is loaded alone from FT's checkpoint, run on those inputs with hooks that accumulate H
# at every Linear, and its outputs become the next block's inputs. Memory holds one block
# and the hidden states, never the model. transformers builds the blocks (on the meta device,
# where they take no memory) and is imported only with --calib.
#
# Whose activations: the fine-tune's. They are the inputs the compressed model should
# reproduce, and they are the same for every budget. Config.calib_model = "base" runs the
# base instead, to compare.

CALIB_WINDOW = 512          # tokens per calibration row cut from texts
CALIB_BATCH = 8192          # tokens per forward call


def import_transformers():
    try:
        import transformers
    except ImportError:
        raise DeltaComeError("--calib needs the transformers package (pip install "
                             "transformers); compression without --calib does not") from None
    return transformers


def load_calibration(path: str | Path, ft: Path, tokens: int, vocab_size: int) -> torch.Tensor:
    """Calibration token ids (n, T) int64 from `path`: a .safetensors file with an integer
    tensor `input_ids` (N, T), or texts (.txt: the whole file; .jsonl: one {"text": ...} per
    line) tokenized with FT's tokenizer, joined by EOS and cut into rows of CALIB_WINDOW.
    Keeps the first max(1, tokens // T) rows; every id must be in [0, vocab_size)."""
    path = Path(path)
    if not path.is_file():
        raise DeltaComeError(f"--calib {path}: no such file")
    if path.suffix == ".safetensors":
        with open_safetensors(path) as f:
            if "input_ids" not in f.keys():
                raise DeltaComeError(f"--calib {path}: no tensor 'input_ids' (integer token ids, "
                                     f"shape (N, T))")
            ids = f.get_tensor("input_ids")
        if ids.ndim != 2 or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise DeltaComeError(f"--calib {path}: input_ids must be integer token ids of shape "
                                 f"(N, T), got {str(ids.dtype).removeprefix('torch.')} "
                                 f"{tuple(ids.shape)}")
    elif path.suffix in (".txt", ".jsonl"):
        ids = tokenize_texts(read_texts(path), path, ft, tokens)
    else:
        raise DeltaComeError(f"--calib {path}: expected a .safetensors, .txt or .jsonl file")
    if ids.numel() == 0:
        raise DeltaComeError(f"--calib {path}: no calibration tokens in it")
    ids = ids[:max(1, tokens // ids.shape[1])].long()
    bad = (ids < 0) | (ids >= vocab_size)
    if bad.any():
        raise DeltaComeError(f"--calib {path}: token id {int(ids[bad][0])} is outside FT's "
                             f"vocabulary (0..{vocab_size - 1})")
    return ids


def read_texts(path: Path) -> list[str]:
    """The texts of a .txt (one, the whole file) or .jsonl file (one per line)."""
    raw = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".txt":
        return [raw] if raw.strip() else []
    texts = []
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        text = record.get("text") if isinstance(record, dict) else record
        if not isinstance(text, str):
            raise DeltaComeError(f"--calib {path}:{number}: expected a JSON object with a "
                                 f"\"text\" string")
        texts.append(text)
    return texts


def tokenize_texts(texts: list[str], path: Path, ft: Path, tokens: int) -> torch.Tensor:
    """Texts -> (n, CALIB_WINDOW) token ids with FT's tokenizer (one shorter row if that is
    all there is), at most about `tokens` of them."""
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    if not any((ft / n).is_file() for n in names):
        raise DeltaComeError(f"--calib {path}: texts need FT's tokenizer and {ft} has none "
                             f"(give token ids as input_ids in a .safetensors file instead)")
    try:
        tok = import_transformers().AutoTokenizer.from_pretrained(ft)
    except DeltaComeError:
        raise
    except Exception as e:              # transformers raises many types for a broken tokenizer
        raise DeltaComeError(f"{ft}: cannot load its tokenizer ({e})") from None
    stream = []
    for text in texts:
        stream += tok(text, add_special_tokens=False)["input_ids"]
        if tok.eos_token_id is not None:
            stream.append(tok.eos_token_id)
        if len(stream) >= tokens:
            break
    T = min(CALIB_WINDOW, len(stream))
    n = len(stream) // T if T else 0
    return torch.tensor(stream[:n * T], dtype=torch.long).view(n, T)


class _BlockInputs(Exception):
    """Raised by the stand-in for block 0 with what block 0 was called with."""

    def __init__(self, args, kwargs):
        super().__init__("block 0 reached")
        self.args, self.kwargs = args, kwargs


class _Catcher(torch.nn.Module):
    def forward(self, *args, **kwargs):
        raise _BlockInputs(args, kwargs)


class BlockRunner:
    """The fine-tune FT run block by block on calibration tokens (see the section above).

    `grams(i)` runs block i on the current hidden states, returns {weight name: H (in, in)
    fp32} for every Linear of the block (matrices reading the same input share one H), and
    advances the hidden states to block i's outputs. Blocks must be run in order."""

    def __init__(self, ft: str | Path, calib: str | Path, tokens: int, device: torch.device):
        tf = import_transformers()
        self.ft, self.device = Path(ft), device
        if not (self.ft / "config.json").is_file():
            raise DeltaComeError(f"--calib needs FT as a Hugging Face directory with its "
                                 f"config.json (the model is run block by block); {ft} is not")
        try:
            config = tf.AutoConfig.from_pretrained(self.ft)
        except Exception as e:          # unknown architecture, bad config.json
            raise DeltaComeError(f"{ft}: transformers cannot read its config ({e})") from None
        self.ids = load_calibration(calib, self.ft, tokens, config.vocab_size)
        try:
            with torch.device("meta"):                       # shapes only, no memory
                model = tf.AutoModelForCausalLM.from_config(config)
        except Exception as e:
            raise DeltaComeError(f"{ft}: transformers cannot build this model ({e})") from None
        self.reader = CheckpointReader(self.ft)
        self.prefix, self.blocks = decoder_blocks(model, config)
        self.hidden, self.kwargs = self.block_inputs(model)

    def block_inputs(self, model) -> tuple[list[torch.Tensor], list[dict]]:
        """Block 0's inputs, one (hidden (b, T, hidden), kwargs) per batch of calibration rows."""
        parent, _, attr = self.prefix.rpartition(".")
        setattr(model.get_submodule(parent), attr, torch.nn.ModuleList([_Catcher()]))
        model.to_empty(device=self.device)
        model.float()
        rebuild_computed_buffers(model, self.device)
        state = model.state_dict()
        embedding = next(n for n, p in model.named_parameters()
                         if p is model.get_input_embeddings().weight)
        if embedding not in self.reader.files:
            raise DeltaComeError(f"{self.ft}: tensor {embedding} (the input embedding) is missing")
        model.load_state_dict({n: self.reader.get(n) for n in state if n in self.reader.files},
                              strict=False)
        hidden, kwargs = [], []
        rows = max(1, CALIB_BATCH // self.ids.shape[1])
        with torch.no_grad():
            for batch in self.ids.split(rows):
                try:
                    model(input_ids=batch.to(self.device), use_cache=False)
                except _BlockInputs as caught:
                    hidden.append(caught.args[0] if caught.args else
                                  caught.kwargs.pop("hidden_states"))
                    kwargs.append(caught.kwargs)
                else:
                    raise DeltaComeError(f"{self.ft}: the model never called its first block")
        return hidden, kwargs

    def names(self, i: int) -> list[str]:
        """Checkpoint names of block i's tensors."""
        return [f"{self.prefix}.{i}.{k}" for k in self.blocks[i].state_dict()]

    @torch.no_grad()
    def grams(self, i: int) -> dict[str, torch.Tensor]:
        block = self.blocks[i]
        names = dict(zip(block.state_dict(), self.names(i)))
        missing = [n for n in names.values() if n not in self.reader.files]
        if missing:
            raise DeltaComeError(f"{self.ft}: tensor {missing[0]} of block {i} is missing")
        block.to_empty(device=self.device)
        block.float()
        block.load_state_dict({k: self.reader.get(n) for k, n in names.items()})
        linears = {f"{self.prefix}.{i}.{sub}.weight": m for sub, m in block.named_modules()
                   if isinstance(m, torch.nn.Linear)}
        hooks = GramHooks(linears)
        try:
            for j, (h, kw) in enumerate(zip(self.hidden, self.kwargs)):
                out = block(h, **kw)
                self.hidden[j] = out[0] if isinstance(out, tuple) else out
                hooks.next_call()
        finally:
            grams = hooks.close()
        block.to_empty(device="meta")                               # free the block
        for name, H in grams.items():
            if not torch.isfinite(H).all():
                raise DeltaComeError(f"--calib: the inputs of {name} contain NaN or Inf")
        return grams

    def close(self):
        self.reader.close()


def decoder_blocks(model, config) -> tuple[str, torch.nn.ModuleList]:
    """The model's list of decoder blocks and its name, e.g. "model.layers"."""
    depth = getattr(config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == depth and name:
            return name, module
    raise DeltaComeError(f"--calib: cannot find the {depth} decoder blocks of "
                         f"{type(model).__name__}")


def rebuild_computed_buffers(model, device: torch.device):
    """Buffers that are not in the checkpoint are computed at construction (rotary
    embeddings' frequencies); to_empty left them uninitialized, so their modules are rebuilt
    on `device` from the model's config."""
    saved = set(model.state_dict())
    owners = {n.rpartition(".")[0] for n, _ in model.named_buffers() if n not in saved}
    for owner in sorted(owners):
        module = model.get_submodule(owner)
        try:
            fresh = type(module)(config=module.config).to(device)
        except Exception as e:
            raise DeltaComeError(f"--calib: cannot rebuild {owner} ({type(module).__name__}: "
                                 f"{e})") from None
        parent, _, attr = owner.rpartition(".")
        setattr(model.get_submodule(parent), attr, fresh)


class GramHooks:
    """Forward pre-hooks that accumulate H = Σ xᵀx / tokens over the inputs x (…, in) of each
    Linear. Linears called on the same tensor (q, k and v; gate and up) share one H, computed
    once. Call `next_call()` after each forward call, `close()` for {weight name: H}."""

    def __init__(self, linears: dict[str, torch.nn.Module]):
        self.sums, self.tokens, self.owner = {}, {}, {}
        self.seen = {}                   # id(x) -> (x, key) in this call; x held: ids stay unique
        self.handles = [m.register_forward_pre_hook(self.hook(n)) for n, m in linears.items()]

    def hook(self, name: str):
        def accumulate(module, args):
            x = args[0]
            seen = self.seen.get(id(x))
            seen = seen if seen is not None and seen[0] is x else None
            key = self.owner.setdefault(name, seen[1] if seen else name)
            if seen:
                return                   # counted already for this call
            self.seen[id(x)] = (x, key)
            x2 = x.reshape(-1, x.shape[-1]).float()                        # (tokens, in)
            self.sums[key] = self.sums.get(key, 0) + x2.mT @ x2              # (in, in)
            self.tokens[key] = self.tokens.get(key, 0) + x2.shape[0]
        return accumulate

    def next_call(self):
        self.seen.clear()

    def close(self) -> dict[str, torch.Tensor]:
        for h in self.handles:
            h.remove()
        H = {key: self.sums[key] / self.tokens[key] for key in self.sums}
        return {name: H[key] for name, key in self.owner.items()}


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
    """'auto' (cuda where there is one, else cpu), 'cpu', 'cuda' or 'cuda:N' -> torch.device.
    Anything else (a typo, '', 'meta', 'mps'), or a CUDA device this machine lacks, is refused."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    m = re.fullmatch(r"cpu|cuda(?::(\d+))?", device) if isinstance(device, str) else None
    if m is None:
        raise DeltaComeError(f"device {short(device)}: expected auto, cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeltaComeError(f"device {device}: CUDA is not available on this machine")
    if m.group(1) and int(m.group(1)) >= torch.cuda.device_count():
        raise DeltaComeError(f"device {device}: this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    return torch.device(device)


def check_writable(out: Path, directory_ok: bool = False):
    parent = Path(os.path.abspath(out)).parent          # of OUT itself, not of a link's target
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
        raise DeltaComeError(f"{out}: is a directory; OUT is written as one .safetensors file")


# ----------------------------------------------------------------------------------------------
# Outputs. No command writes over one of its inputs, and none replaces anything it did not
# write: an existing OUT is replaced only with overwrite=True (--overwrite), and only if it is
# a delta file (compress), a checkpoint `apply` wrote, or a directory `example` wrote. `apply`
# and `example` leave a MARKER file in each directory they write, listing what they put there;
# a directory holding anything else is not theirs to replace. Every check runs before any
# tensor is read.

MARKER = ".deltacome"                # JSON: {"written_by": "deltacome apply", "files": [...]}
MERGED_KEY = "deltacome.merged"      # metadata of each file `apply` writes: the delta file's name


def same_path(a: Path, b: Path) -> bool:
    """a and b are one file or directory: the same resolved path (symbolic links followed) or
    the same inode (hard links, bind mounts)."""
    try:
        return a.resolve() == b.resolve() or os.path.samefile(a, b)
    except (OSError, RuntimeError):      # one does not exist; or a symbolic link loop
        return False


def encloses(outer: Path, inner: Path) -> bool:
    """`inner` is `outer` or lies somewhere inside it."""
    try:
        inner = inner.resolve()
    except (OSError, RuntimeError):      # a symbolic link loop
        return False
    return any(same_path(outer, p) for p in (inner, *inner.parents))


def check_apart(out: Path, inputs) -> None:
    """Refuse an OUT that is, contains or lies inside one of `inputs`, or that is or contains
    the current directory."""
    for path in map(Path, inputs):
        relation = ("is" if same_path(out, path) else "lies inside" if encloses(path, out)
                    else "contains" if encloses(out, path) else None)
        if relation:
            raise DeltaComeError(f"{out}: {relation} the input {path}; choose an OUT apart from "
                                 f"the inputs")
    if encloses(out, Path.cwd()):
        raise DeltaComeError(f"{out}: is or contains the current directory; choose another OUT")


def file_metadata(path: Path) -> dict:
    """The safetensors metadata of `path`, or {} if it is not a readable safetensors file."""
    try:
        with open_safetensors(path) as f:
            return f.metadata() or {}
    except DeltaComeError:
        return {}


def written_by(directory: Path, command: str) -> bool:
    """`directory` holds a MARKER saying `command` wrote it, and nothing the MARKER does not
    list."""
    try:
        record = json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return False
    ours = isinstance(record, dict) and record.get("written_by") == f"deltacome {command}"
    files = record.get("files") if ours else None
    return (isinstance(files, list) and all(isinstance(f, str) for f in files)
            and {p.name for p in directory.iterdir()} <= {MARKER, *files})


def write_marker(directory: Path, command: str) -> None:
    """Mark `directory` as written by `command`, listing everything in it."""
    files = sorted(p.name for p in directory.iterdir() if p.name != MARKER)
    (directory / MARKER).write_text(json.dumps({"written_by": f"deltacome {command}",
                                                "files": files}, indent=1) + "\n")


def is_delta_file(path: Path) -> bool:
    return path.is_file() and FORMAT_NAME in file_metadata(path)


def is_merged(path: Path) -> bool:
    """`path` is a checkpoint `apply` wrote: a directory it marked, or a file with MERGED_KEY."""
    return written_by(path, "apply") if path.is_dir() else MERGED_KEY in file_metadata(path)


def check_replaceable(out: Path, overwrite: bool, ours, what: str) -> None:
    """Refuse an existing OUT unless ours(OUT) (it is `what`) and `overwrite`. An absent OUT,
    or an empty directory, holds nothing to lose."""
    if not os.path.lexists(out) or (out.is_dir() and not out.is_symlink()
                                    and not any(out.iterdir())):
        return
    if not ours(out):
        raise DeltaComeError(f"{out}: exists and is not {what} (or holds files it did not "
                             f"write); not replaced, choose another OUT")
    if not overwrite:
        raise DeltaComeError(f"{out}: exists ({what}); pass --overwrite to replace it")


def move_into_place(final: Path, out: Path) -> None:
    """Rename `final` to `out`, replacing what is there (checked: ours to replace). Renames
    only, so OUT is never half-written; on failure the old OUT is put back."""
    if not os.path.lexists(out):
        os.replace(final, out)
        return
    old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old."))
    try:
        os.replace(out, old / out.name)
        try:
            os.replace(final, out)
        except OSError:
            os.replace(old / out.name, out)
            raise
    finally:
        shutil.rmtree(old)


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


def tensor_sizes(path: str | Path) -> dict[str, tuple[list[int], int]]:
    """{name: (shape, stored bytes)} of every tensor of a .safetensors file, from its header
    alone (no tensor data is read). For files `open_safetensors` has already accepted."""
    with open(path, "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    return {k: (v["shape"], v["data_offsets"][1] - v["data_offsets"][0])
            for k, v in header.items() if k != "__metadata__"}


@dataclass
class StorageRow:
    """One kind of content of a delta file: how many tensors, the fp16 bytes of their delta
    (2 per element of FT's tensor; None where not known), and the bytes the file spends."""
    kind: str
    tensors: int
    fp16_bytes: int | None
    stored_bytes: int


def storage(meta: dict, sizes: dict, file_bytes: int) -> list[StorageRow]:
    """What a delta file holds, kind by kind, every stored byte counted, then the whole file
    against the fp16 delta of the whole fine-tune (meta's whole_fp16_bytes; None for a
    version-1 file, which does not record it). `sizes` as tensor_sizes."""
    def nbytes(prefix):
        return sum(b for k, (_, b) in sizes.items() if k.startswith(prefix))
    rows = []
    for role, kind in (("projection", "projection matrices, compressed"),
                       ("vocab", "vocabulary matrices, compressed")):
        mats = {n: m for n, m in meta["matrices"].items() if m.get("role", "projection") == role}
        rows.append(StorageRow(kind, len(mats),
                               sum(2 * math.prod(m["shape"]) for m in mats.values()),
                               sum(nbytes(f"{n}.band") for n in mats)))
    entries = meta.get("rows", {})
    rows.append(StorageRow(  # rows a compressed matrix covers are counted there
        "vocabulary rows, stored whole", len(entries),
        sum(2 * math.prod(e["shape"][1:])
            * (e["shape"][0] - e["base_rows"] * (n in meta["matrices"]))
            for n, e in entries.items()),
        sum(nbytes(f"rows.{n}.") for n in entries)))
    rows.append(StorageRow("other tensors, carried whole", len(meta["carried"]),
                           sum(2 * math.prod(sizes[f"carry.{n}"][0]) for n in meta["carried"]),
                           sum(sizes[f"carry.{n}"][1] for n in meta["carried"])))
    files = meta.get("files", [])
    rows.append(StorageRow("config/tokenizer files of FT", len(files), 0,
                           sum(sizes[f"file.{n}"][1] for n in files)))
    whole = meta.get("whole_fp16_bytes")
    rows.append(StorageRow("tensors equal to BASE, not stored", meta.get("unchanged", 0),
                           None if whole is None else whole - sum(r.fp16_bytes for r in rows), 0))
    rows.append(StorageRow("whole file (header included)", sum(r.tensors for r in rows), whole,
                           file_bytes))
    return rows


def storage_table(rows: list[StorageRow]) -> str:
    """The rows of `storage` as an aligned table; ratio = stored / fp16 delta bytes."""
    def ratio(r):
        if not r.fp16_bytes or not r.stored_bytes:
            return "" if r.fp16_bytes is not None else "not recorded (version-1 file)"
        x = r.stored_bytes / r.fp16_bytes
        return f"{x:.4f}" + (f" = 1/{1 / x:.1f}" if x < 1 else "")
    lines = [f"{'the file holds':<36}{'tensors':>8}{'fp16 delta MB':>15}{'stored MB':>11}  ratio"]
    for r in rows:
        if not r.tensors and r is not rows[-1]:
            continue
        fp16 = "—" if r.fp16_bytes is None else f"{r.fp16_bytes / 1e6:,.2f}"
        lines.append(f"{r.kind:<36}{r.tensors:>8}{fp16:>15}{r.stored_bytes / 1e6:>11,.2f}  "
                     f"{ratio(r)}")
    lines.append("ratio = stored bytes / fp16 bytes of the same tensors' delta (2 per element); "
                 "whole file: every byte of the file / the fp16 delta of every tensor of FT")
    return "\n".join(lines)


@dataclass
class Summary:
    """What `compress` did, for the end-of-run table and for callers."""
    matrices: int = 0
    delta_fp16_bytes: int = 0        # 2 bytes per element of every compressed projection
    compressed_bytes: int = 0        # every stored byte of those matrices
    carried_bytes: int = 0           # tensors copied from FT because they differ from BASE
    file_bytes: int = 0
    gpu_peak_bytes: int = 0
    calibration_tokens: int = 0      # with --calib: tokens the fine-tune was run on
    calibrated: int = 0              # matrices compressed against their inputs' H
    errors: list[float] = field(default_factory=list)         # projections
    vocab_errors: list[float] = field(default_factory=list)   # compressed vocabulary tensors
    not_float: dict[str, str] = field(default_factory=dict)  # selected matrices carried: dtypes
    storage: list[StorageRow] = field(default_factory=list)   # what the file holds
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(
        ("read", "svd+quantize", "write"), 0.0))

    def table(self) -> str:
        def mean(xs):
            return f"{sum(xs) / len(xs):.4f}" if xs else "—"
        rows = [("mean rel. error", f"{mean(self.errors)}  ‖Δ−Δ̂‖/‖Δ‖ averaged over compressed "
                                    f"projections; vocabulary matrices {mean(self.vocab_errors)}"),
                ("time", "  ".join(f"{k} {v:.1f}s" for k, v in self.seconds.items())
                 + f"  total {sum(self.seconds.values()):.1f}s"),
                ("peak host RSS", f"{peak_rss_mb():,.0f} MB")]
        if self.gpu_peak_bytes:
            rows.append(("peak GPU memory", f"{self.gpu_peak_bytes / 1e6:,.0f} MB"))
        if self.not_float:
            dtypes = ", ".join(sorted(set(self.not_float.values())))
            rows.append(("not compressed", f"{len(self.not_float)} matrices matching --include "
                                           f"are not floating point ({dtypes}): carried exactly"))
        if self.calibration_tokens:
            rows.append(("calibration", f"{self.calibration_tokens:,} tokens; {self.calibrated} "
                                        f"of {self.matrices} matrices fitted to their inputs"))
        return storage_table(self.storage) + "\n" + "\n".join(f"{k:<22}{v}" for k, v in rows)


def compress(base: str | Path, ft: str | Path, out: str | Path, cfg: Config = Config(),
             progress: bool = True, overwrite: bool = False) -> Summary:
    """Compress FT's delta against BASE into the delta file OUT; returns a Summary. OUT must
    lie apart from BASE and FT; an existing OUT is replaced only if it is a delta file and
    `overwrite` is set.

    Projections (cfg.include) are compressed; vocabulary tensors (cfg.vocab_include) are
    compressed, stored as changed rows, or carried, by cfg.vocab; every other tensor that
    differs from BASE is carried whole, and so are selected matrices that are not floating
    point (integer, bool, float8: Δ̂ rounded back would not be exact); FT's config and
    tokenizer files that differ from BASE's are stored (SIDE_FILES). FT may hold other float
    dtypes than BASE (bf16 against fp16): Δ is taken in fp32 and the file records FT's
    dtypes, which `apply` writes."""
    from tqdm import tqdm

    base, ft, out = Path(base), Path(ft), Path(out)
    check_apart(out, [base, ft])
    base_r, ft_r = CheckpointReader(base), CheckpointReader(ft)
    check_apart(out, {*base_r.files.values(), *ft_r.files.values()})   # shards an index names
    check_writable(out)
    check_replaceable(out, overwrite, is_delta_file, "a delta file")
    check_config(cfg)
    device = pick_device(cfg.device)
    missing = sorted(set(base_r.names()) - set(ft_r.names()))
    extra = sorted(set(ft_r.names()) - set(base_r.names()))
    if missing or extra:
        which = f"tensor {missing[0]} is in BASE but missing in FT" if missing else \
            f"tensor {extra[0]} is in FT but not in BASE"
        raise DeltaComeError(f"{which} ({len(missing) + len(extra)} mismatched names; "
                             f"different architectures?)")
    include, vocab = re.compile(cfg.include), re.compile(cfg.vocab_include)
    summary = Summary()
    meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "group_size": cfg.group_size,
            "config": asdict(cfg), "matrices": {}, "carried": [], "rows": {}, "files": [],
            "dtypes": {}, "whole_fp16_bytes": 0, "unchanged": 0, "base_probes": {}}
    runner = BlockRunner(base if cfg.calib_model == "base" else ft, cfg.calib, cfg.calib_tokens,
                         device) if cfg.calib else None
    order = calibrated_order(runner, base_r.names(), summary) if runner else \
        ((name, None) for name in base_r.names())

    def read(item):                 # runs one tensor ahead in a thread: I/O overlaps the GPU
        name, H = item
        w_base, w_ft = base_r.get(name), ft_r.get(name)
        check_finite(name, w_base, str(base))
        check_finite(name, w_ft, str(ft))
        matrix = w_base.ndim == 2 and w_base.dtype in FLOAT_DTYPES
        kind = ("matrix" if matrix and include.search(name) else
                "vocab" if matrix and vocab.search(name) else "other")
        if w_base.ndim == 2 and include.search(name) and kind == "other":
            summary.not_float[name] = str(w_base.dtype).removeprefix("torch.")
        if w_base.shape != w_ft.shape:
            check_resizable(name, w_base, w_ft, kind == "vocab")
        shared = w_ft[: w_base.shape[0]] if w_base.ndim else w_ft   # rows BASE has too
        return name, H, kind, w_base, w_ft, extract_delta(w_base, shared, name)

    def add_matrix(name, delta, dtype, role, H=None):
        t = time.perf_counter()
        delta = delta.to(device)
        cm = compress_matrix(delta, cfg, str(dtype).removeprefix("torch."), H)
        err = relative_error(delta, decompress_matrix(cm))
        summary.seconds["svd+quantize"] += time.perf_counter() - t
        summary.calibrated += H is not None
        add_compressed(writer, name, cm)
        meta["matrices"][name] = {"shape": list(cm.shape), "dtype": cm.dtype,
                                  "bands": [[b.bits, b.rank] for b in cm.bands],
                                  "error": round(err, 6), "role": role}
        return cm, err

    writer = SafetensorsWriter(out, checksums=True)
    reads = prefetched(read, order)
    items = tqdm(reads, desc="compress", total=len(base_r.names()), unit="tensor",
                 disable=not progress)
    try:
        for name, data in changed_side_files(base, ft).items():
            writer.add(f"file.{name}", torch.frombuffer(bytearray(data), dtype=torch.uint8))
            meta["files"].append(name)
        t0, calibrated = time.perf_counter(), 0.0
        for name, H, kind, w_base, w_ft, delta in items:
            t1 = time.perf_counter()
            calibrating = summary.seconds.get("calibrate", 0.0) - calibrated   # since t0
            summary.seconds["read"] += t1 - t0 - calibrating
            busy = summary.seconds["svd+quantize"]
            meta["whole_fp16_bytes"] += 2 * w_ft.numel()
            meta["base_probes"][name] = probe(w_base)
            if w_ft.dtype != w_base.dtype:
                meta["dtypes"][name] = str(w_ft.dtype).removeprefix("torch.")
            resized = w_base.shape != w_ft.shape
            if kind == "matrix":
                cm, err = add_matrix(name, delta, w_ft.dtype, "projection", H)
                summary.matrices += 1
                summary.delta_fp16_bytes += 2 * delta.numel()
                summary.compressed_bytes += cm.nbytes()
                summary.errors.append(err)
            elif kind == "vocab" and cfg.vocab != "carry":
                changed = changed_rows(delta)                                   # (K,)
                index = torch.arange(w_base.shape[0], w_ft.shape[0])            # added rows
                shared = w_ft[: w_base.shape[0]]                                # BASE's rows
                if len(changed) and vocab_storage(shared, len(changed), cfg) == "compress":
                    summary.vocab_errors.append(add_matrix(name, delta, w_ft.dtype, "vocab")[1])
                else:
                    index = torch.cat([changed, index])
                if len(index):
                    writer.add(f"rows.{name}.index", index.to(torch.int32))
                    writer.add(f"rows.{name}.values", w_ft[index])
                    meta["rows"][name] = {"shape": list(w_ft.shape),
                                          "base_rows": w_base.shape[0], "count": len(index),
                                          "dtype": str(w_ft.dtype).removeprefix("torch.")}
                if not (len(changed) or len(index)):
                    meta["unchanged"] += 1
            elif resized or not same_bits(w_base.to(w_ft.dtype), w_ft):  # BASE's, cast, is not FT's
                writer.add(f"carry.{name}", w_ft)
                meta["carried"].append(name)
                summary.carried_bytes += w_ft.numel() * w_ft.element_size()
            else:
                meta["unchanged"] += 1
            t0, calibrated = time.perf_counter(), summary.seconds.get("calibrate", 0.0)
            summary.seconds["write"] += t0 - t1 - (summary.seconds["svd+quantize"] - busy)
        t3 = time.perf_counter()
        meta["checksums"] = writer.checksums
        text = json.dumps(meta)
        writer.finish({FORMAT_NAME: text, META_CHECKSUM: text_checksum(text)})
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
        if runner is not None:
            runner.close()
    if device.type == "cuda":
        summary.gpu_peak_bytes = torch.cuda.max_memory_allocated(device)
    summary.file_bytes = out.stat().st_size
    summary.storage = storage(meta, tensor_sizes(out), summary.file_bytes)
    return summary


def calibrated_order(runner: BlockRunner, names: list[str], summary: Summary):
    """(name, H or None) for every tensor: those outside the decoder blocks first, without H;
    then block by block, each block's Hs computed when the block is reached (the time it
    takes is added to summary.seconds["calibrate"])."""
    block_of = {name: i for i in range(len(runner.blocks)) for name in runner.names(i)}
    summary.calibration_tokens = runner.ids.numel()
    yield from ((name, None) for name in names if name not in block_of)
    for i in range(len(runner.blocks)):
        t = time.perf_counter()
        grams = runner.grams(i)
        summary.seconds["calibrate"] = (summary.seconds.get("calibrate", 0.0)
                                        + time.perf_counter() - t)
        yield from ((name, grams.get(name)) for name in runner.names(i))


def apply(base: str | Path, delta_path: str | Path, out: str | Path, device: str = "auto",
          progress: bool = True, overwrite: bool = False) -> Path:
    """Rebuild the fine-tune W_base + Δ̂ from BASE and a delta file, in BASE's layout and FT's
    dtypes (as the file records them; BASE's where FT had the same): a single file if BASE is
    a file, else a directory with BASE's shards, index, config and tokenizer files (FT's where
    the file stores them; else BASE's config with its dtype set to FT's where FT's differed).
    Built under a scratch name with the usual permissions and renamed into place when
    complete. OUT must lie apart from BASE and the delta file; an existing OUT is replaced
    only if `apply` wrote it (is_merged) and `overwrite` is set. BASE must be finite and fit
    the delta (check_against_base), and W_base + Δ̂ finite in FT's dtype."""
    from tqdm import tqdm

    base, delta_path, out = Path(base), Path(delta_path), Path(os.path.abspath(out))
    check_apart(out, [base, delta_path])
    files = checkpoint_files(base)
    check_apart(out, set(files.values()))
    check_writable(out, directory_ok=base.is_dir())
    check_replaceable(out, overwrite, is_merged, "a checkpoint written by apply")
    dev = pick_device(device)
    delta = read_delta_file(delta_path)
    check_against_base(delta, checkpoint_layout(files), delta_path, base)
    scratch = new_scratch(out.parent, f".{out.name}.", directory=True)
    elements = collections.Counter()             # float elements written, by dtype
    bar = tqdm(sorted(set(files.values())), desc="apply", unit="shard", disable=not progress)
    try:
        for shard in bar:
            target = scratch / (out.name if base.is_file() else shard.name)
            elements += merge_shard(shard, delta, dev, target, delta_path.name)
        if base.is_dir():
            for extra in base.iterdir():
                if extra.is_file() and extra.suffix != ".safetensors" and extra.name != MARKER:
                    shutil.copy2(extra, scratch / extra.name)
            for name, data in delta.files.items():          # FT's config, tokenizer
                (scratch / name).write_bytes(data)
            if delta.meta.get("dtypes") and elements and "config.json" not in delta.files \
                    and (scratch / "config.json").is_file():
                set_config_dtype(scratch / "config.json", elements.most_common(1)[0][0])
            write_marker(scratch, "apply")
            final = scratch
        else:
            final = scratch / out.name
        move_into_place(final, out)
    except OSError as e:
        raise output_error(out, e) from None
    finally:
        bar.close()                     # the bar ends its line before any error is printed
        if scratch.exists():
            shutil.rmtree(scratch)
    return out


def merge_shard(shard: Path, delta: DeltaFile, device, target: Path,
                delta_name: str) -> collections.Counter:
    """One file of BASE -> the same file of the fine-tune at `target`, in FT's dtypes:
    compressed matrices rebuilt as W_base + Δ̂ on `device`, stored rows put in place (a
    resized vocabulary grows to FT's rows), carried tensors taken from the delta file, every
    other tensor copied. Returns the float elements written, by dtype."""
    elements = collections.Counter()
    with SafetensorsWriter(target) as writer, open_safetensors(shard) as f:
        for name in f.keys():
            w = f.get_tensor(name)
            check_finite(name, w, f"BASE {shard}")
            expected = delta.meta.get("base_probes", {}).get(name)
            if expected is not None and not probes_match(expected, probe(w), w.dtype):
                raise DeltaComeError(f"tensor {name}: BASE {shard} is not the base "
                                     f"{delta_name} was made against (its values differ)")
            dtype = fine_tune_dtype(delta, name, w.dtype)
            if name in delta.matrices:
                dhat = decompress_matrix(delta.matrices[name].to(device))
                w = (w.to(device).float() + dhat).to(dtype)
                if not torch.isfinite(w).all():
                    raise DeltaComeError(f"tensor {name}: W_base + Δ̂ is not finite in "
                                         f"{w.dtype} (the delta file is corrupt, or made "
                                         f"for another base)")
            if name in delta.rows:
                w = place_rows(w.to(dtype), delta.rows[name])
            elif name in delta.carried:
                w = delta.carried[name]
            else:
                w = w.to(dtype)
            if w.is_floating_point():
                elements[w.dtype] += w.numel()
            writer.add(name, w)
        writer.finish({**(f.metadata() or {}), MERGED_KEY: delta_name})
    return elements


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
    summed on a GPU, whose matmul rounds differently), every other tensor exactly; NaN or
    Inf anywhere fails."""
    from tqdm import tqdm

    delta = read_delta_file(delta_path)
    with contextlib.closing(CheckpointReader(base)) as base_r, \
            contextlib.closing(CheckpointReader(merged)) as merged_r:
        if sorted(base_r.names()) != sorted(merged_r.names()):
            raise DeltaComeError(f"{merged}: its tensor names differ from BASE {base}")
        check_against_base(delta, checkpoint_layout(base_r.files), delta_path, base)
        worst = 0.0
        with tqdm(base_r.names(), desc="verify", unit="tensor", disable=not progress) as names:
            for name in names:      # an error closes the bar first: its line ends before ours
                worst = max(worst, verify_tensor(name, base_r.get(name), merged_r.get(name),
                                                 delta, merged))
        count = len(base_r.names())
    for name, data in delta.files.items():
        if Path(merged).is_dir() and Path(base).is_dir() and \
                (Path(merged) / name).read_bytes() != data:
            raise DeltaComeError(f"{merged}: {name} differs from FT's, stored in the delta file")
    return (f"verified {count} tensors: {len(delta.matrices)} rebuilt within "
            f"{worst:.2f} ulp of BASE + Δ̂, {len(delta.rows)} with FT's rows, "
            f"{len(delta.carried)} carried and the rest equal")


def verify_tensor(name: str, w_base: torch.Tensor, w: torch.Tensor, delta: DeltaFile,
                  merged: str | Path) -> float:
    """One tensor of `verify`: how many ulps of its dtype a rebuilt matrix is off BASE + Δ̂
    (at most 1, else an error); stored rows, carried and other tensors must be bit-exact
    (0). Each must have FT's dtype as the delta file records it."""
    rows = delta.rows.get(name)
    dtype = fine_tune_dtype(delta, name, w_base.dtype)
    shape = rows.shape if rows else tuple((delta.carried.get(name, w_base)).shape)
    if w.dtype != dtype or tuple(w.shape) != tuple(shape):
        raise DeltaComeError(f"tensor {name}: {w.dtype} {tuple(w.shape)} in {merged}, "
                             f"expected {dtype} {tuple(shape)}")
    check_finite(name, w_base, "BASE")
    if name not in delta.matrices and rows is None:
        if not same_bits(w, delta.carried.get(name, w_base.to(dtype))):
            raise DeltaComeError(f"tensor {name}: differs from the "
                                 f"{'carried' if name in delta.carried else 'BASE'} tensor")
        return 0.0
    check_finite(name, w, str(merged))
    keep = torch.ones(w_base.shape[0], dtype=torch.bool)       # rows that W_base (+ Δ̂) gives
    if rows is not None:
        if not same_bits(w[rows.index], rows.values.to(w.dtype)):
            raise DeltaComeError(f"tensor {name}: its stored rows differ from FT's")
        keep[rows.index[rows.index < rows.base_rows]] = False
    w, w_base = w[: w_base.shape[0]][keep], w_base[keep]
    if name not in delta.matrices:
        if not same_bits(w, w_base.to(dtype)):
            raise DeltaComeError(f"tensor {name}: rows not stored differ from BASE")
        return 0.0
    expected = w_base.float() + decompress_matrix(delta.matrices[name])[keep]
    ulp = torch.finfo(w.dtype).eps * expected.abs().clamp_min(torch.finfo(w.dtype).tiny)
    excess = float(((w.float() - expected).abs() / ulp).amax()) if w.numel() else 0.0
    if not excess <= 1.0:                                        # NaN fails too
        raise DeltaComeError(f"tensor {name}: differs from BASE + Δ̂ by {excess:.2f} "
                             f"ulp of {w.dtype}")
    return excess


def info(delta_path: str | Path) -> str:
    """A human-readable summary of a delta file: one row per compressed matrix and per row
    delta, then what the file holds, kind by kind, and the whole-file ratio."""
    d = read_delta_file(delta_path)
    rows = [f"{'matrix':<52}{'shape':>13}  {'bands (bits:rank)':<26}{'bytes':>11}{'ratio':>8}"
            f"{'rel.err':>9}"]
    for name, cm in d.matrices.items():
        nb, full = cm.nbytes(), 2 * cm.shape[0] * cm.shape[1]
        bands = ",".join(f"{b.bits}:{b.rank}" for b in cm.bands) or "(empty)"
        err = d.meta["matrices"][name].get("error", float("nan"))
        label = name + (" (vocab)" if d.role(name) == "vocab" else "")
        rows.append(f"{label:<52}{'x'.join(map(str, cm.shape)):>13}  {bands:<26}{nb:>11,}"
                    f"{nb / max(full, 1):>8.4f}{err:>9.4f}")
    for name, r in d.rows.items():
        added = r.shape[0] - r.base_rows
        what = f"rows: {len(r.index) - added} changed" + (f", {added} added" if added else "")
        rows.append(f"{name:<52}{'x'.join(map(str, r.shape)):>13}  {what:<26}{r.nbytes():>11,}"
                    f"{r.nbytes() / max(2 * math.prod(r.shape), 1):>8.4f}{'exact':>9}")
    sizes = tensor_sizes(delta_path)
    rows += ["", storage_table(storage(d.meta, sizes, Path(delta_path).stat().st_size)),
             f"format version {d.meta['version']}, group size {d.meta['group_size']}"]
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
                 progress: bool = False, overwrite: bool = False) -> tuple[Path, Path]:
    """Write BASE and FT checkpoints of a Llama-shaped model (MODEL_SHAPES; `layers` and
    `width` override its depth and hidden size) whose projection and lm_head deltas have a
    long-tailed spectrum (synthetic_delta), norms fine-tuned a little, and the embedding rows
    of the first vocab/64 tokens changed (as an untied embedding's rows of the tokens seen in
    training), the others not.
    Sharded: one shard per layer plus one for the rest, written as generated, so memory holds
    one layer, never the model. An existing base/ or ft/ is replaced only if make_example
    wrote it and `overwrite` is set. Returns (base_dir, ft_dir)."""
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
            ft["model.embed_tokens.weight"] = base["model.embed_tokens.weight"].clone()
            ft["model.embed_tokens.weight"][: max(1, vocab // 64)] += 0.001 * randn(
                max(1, vocab // 64), hidden)
            base["model.norm.weight"] = ft["model.norm.weight"] = torch.ones(hidden, device=device)
            base["lm_head.weight"] = randn(vocab, hidden) * 0.02
            ft["lm_head.weight"] = base["lm_head.weight"] + synthetic_delta(vocab, hidden, gen)
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
        check_replaceable(d, overwrite, lambda p: written_by(p, "example"),
                          "a directory written by example")
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
        write_marker(d, "example")
    return dirs


def synthetic_delta(out_f: int, in_f: int, gen: torch.Generator, alpha: float = 0.75,
                    scale: float = 0.02, noise: float = 0.02) -> torch.Tensor:
    """A delta with singular values σ_i ∝ (i+1)^-alpha over random orthonormal bases, plus
    white noise at `noise` of its norm: the long-tailed shape Delta-CoMe relies on. With
    alpha = 0.75 a 4096-wide delta has ~82 % of its energy in the top 16 singular values and
    ~92 % in the top 64, close to a real fine-tune's deltas. Made on the generator's
    device; entries have mean |Δ| = scale/100."""
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
    """argparse whose usage errors are one line like every other error, exit status 2, and
    which reads a value starting with '-' and a digit (--budget -1/16) as the option's value,
    as Python 3.13 does, not as an unknown option."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"-\.?\d")

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
            p.add_argument("--layers", type=option(check_positive, integer),
                           help="override the number of layers")
            p.add_argument("--width", type=option(check_positive, integer),
                           help="override the hidden size (intermediate = 2.6875 × width, "
                                "as Llama-2)")
            p.add_argument("--pair-only", action="store_true",
                           help="only write base/ and ft/, do not compress or apply")
        p.add_argument("--budget", type=fraction, default=d.budget,
                       help="bytes per matrix as a fraction of its fp16 delta, e.g. 1/16 "
                            "(default), 1/32, 0.05")
        p.add_argument("--method", default=d.method, type=option(check_method),
                       help="'greedy' (default: measured marginal-return allocation), 'paper' "
                            f"({PAPER_BANDS}), or a band spec BITS:RANK,... with RANK '*' = "
                            "what the budget leaves")
        p.add_argument("--widths", default=",".join(map(str, d.widths)),
                       type=option(check_widths, integers),
                       help="candidate bit widths for greedy (default %(default)s)")
        p.add_argument("--group-size", type=option(check_group_size, integer),
                       default=d.group_size, help="elements per quantization group, a multiple "
                                                  f"of 32 up to {MAX_GROUP_SIZE} (default 128)")
        p.add_argument("--quantizer", choices=("mse", "minmax"), default=d.quantizer,
                       help="mse (default): per-group clipping search + least-squares fit; "
                            "minmax: plain asymmetric min-max")
        p.add_argument("--no-refit", action="store_true",
                       help="quantize U as is instead of refitting it to the quantized V")
        p.add_argument("--include", default=d.include, type=option(check_include),
                       help="regex on tensor names selecting the 2-D matrices to compress "
                            "(default: weights inside numbered transformer blocks)")
        p.add_argument("--vocab", choices=VOCAB_CHOICES, default=d.vocab,
                       help="vocabulary tensors (embeddings, lm_head): auto (default: the "
                            "changed rows where they take no more bytes than compression, "
                            "else compressed), compress, rows (changed rows, exact), or carry "
                            "(whole)")
        p.add_argument("--vocab-include", default=d.vocab_include,
                       type=option(check_regex("--vocab-include")),
                       help="regex on tensor names selecting the vocabulary tensors (default: "
                            "embed_tokens, wte, word_embeddings, tok_embeddings, embed_in, "
                            "lm_head, embed_out)")
        p.add_argument("--svd", choices=("full", "gram", "lowrank"), default=d.svd,
                       help="gram (default: fp64 eigh of the smaller Gram matrix; same result "
                            "as full, and faster), full "
                            "(LAPACK/cuSOLVER SVD), lowrank (randomized, approximate tail)")
        if command == "compress":
            p.add_argument("--calib", metavar="FILE", default=d.calib,
                           help="fit every matrix to its inputs on these calibration tokens: a "
                                ".safetensors with integer input_ids (N, T), or texts (.txt, "
                                ".jsonl) read with FT's tokenizer; needs transformers and FT "
                                "as a HF directory (default: calibration-free; on real "
                                "fine-tunes it lowered each layer's output error but not the "
                                "task accuracy: see the README)")
            p.add_argument("--calib-tokens", type=option(check_positive, integer),
                           default=d.calib_tokens, metavar="N",
                           help="calibration tokens used at most (default %(default)s)")
    if command in ("apply", "verify"):
        p.add_argument("base", help="the base checkpoint the delta was made against")
    if command in ("apply", "info", "verify"):
        p.add_argument("delta", help="delta file written by the compress command")
    if command == "apply":
        p.add_argument("out", help="output: a file if BASE is a file, else a directory")
    if command == "verify":
        p.add_argument("merged", help="the checkpoint `apply` rebuilt")
    if command in ("compress", "example", "apply"):
        p.add_argument("--device", default=d.device, type=option(check_device),
                       help="auto (default), cpu, cuda, cuda:N")
        p.add_argument("--overwrite", action="store_true",
                       help="replace an existing OUT, if deltacome wrote it (never anything "
                            "else, never an input)")
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


# Option values are checked as argparse parses them (`option`), before any file is read;
# `compress` runs the same checks on the Config an API caller gives it (check_config).


def option(check, parse=str):
    """An argparse `type`: check(parse(text)), its error made argparse's one-line message."""
    def convert(text: str):
        try:
            return check(parse(text))
        except (DeltaComeError, ValueError) as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return convert


def integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"not an integer: {text!r}") from None


def integers(text: str) -> tuple[int, ...]:
    return tuple(integer(part) for part in text.split(","))


def check_positive(n: int) -> int:
    if not (is_int(n) and n > 0):
        raise DeltaComeError(f"expected a positive integer, got {short(n)}")
    return n


def valid_group_size(g) -> bool:
    """A multiple of 32 in 32..MAX_GROUP_SIZE: a group's codes fill whole int32 words at
    every container width."""
    return is_int(g) and 32 <= g <= MAX_GROUP_SIZE and g % 32 == 0


def check_group_size(g: int) -> int:
    if not valid_group_size(g):
        raise DeltaComeError(f"group size must be a multiple of 32 in 32..{MAX_GROUP_SIZE}, "
                             f"got {short(g)}")
    return g


def check_widths(widths) -> tuple[int, ...]:
    if not (isinstance(widths, (tuple, list)) and widths
            and all(is_int(w) and 0 <= w <= 8 for w in widths)):
        raise DeltaComeError(f"widths must be integers in 0..8, got {short(widths)}")
    if not any(widths):
        raise DeltaComeError(f"widths {','.join(map(str, widths))}: give at least one width of "
                             f"1..8 bits (0, dropping a vector, is always a candidate)")
    return tuple(widths)


def check_method(method: str) -> str:
    if not isinstance(method, str):
        raise DeltaComeError(f"method must be 'greedy', 'paper' or a band spec, got "
                             f"{short(method)}")
    if method not in ("greedy", "paper"):
        parse_bands(method)
    return method


def check_regex(option: str):
    """A check that `pattern` is a regex, naming `option` in its error."""
    def check(pattern: str) -> str:
        try:
            re.compile(pattern)
        except (re.error, TypeError) as e:
            raise DeltaComeError(f"{option}: bad regex ({e})") from None
        return pattern
    return check


check_include = check_regex("--include")


def check_device(device: str) -> str:
    pick_device(device)
    return device


def check_config(cfg: Config) -> Config:
    """Refuse a Config that `compress` cannot honour, naming the field."""
    if not (isinstance(cfg.budget, (int, float)) and 0 < cfg.budget <= 1):
        raise DeltaComeError(f"budget must be in (0, 1], got {short(cfg.budget)}")
    for name, allowed in (("quantizer", ("mse", "minmax")), ("svd", ("full", "gram", "lowrank"))):
        if getattr(cfg, name) not in allowed:
            raise DeltaComeError(f"{name} must be one of {', '.join(allowed)}, got "
                                 f"{short(getattr(cfg, name))}")
    check_method(cfg.method)
    check_widths(cfg.widths)
    check_group_size(cfg.group_size)
    check_include(cfg.include)
    check_regex("--vocab-include")(cfg.vocab_include)
    if cfg.vocab not in VOCAB_CHOICES:
        raise DeltaComeError(f"vocab must be one of {', '.join(VOCAB_CHOICES)}, got "
                             f"{short(cfg.vocab)}")
    check_device(cfg.device)
    if not isinstance(cfg.calib, (str, os.PathLike)):
        raise DeltaComeError(f"calib must be a file name, got {short(cfg.calib)}")
    if not (is_int(cfg.calib_tokens) and cfg.calib_tokens > 0):
        raise DeltaComeError(f"calib_tokens must be a positive integer, got "
                             f"{short(cfg.calib_tokens)}")
    if cfg.calib_model not in ("ft", "base"):
        raise DeltaComeError(f"calib_model must be 'ft' or 'base', got {short(cfg.calib_model)}")
    return cfg


def config_from_args(args) -> Config:
    return Config(budget=args.budget, method=args.method, widths=args.widths,
                  group_size=args.group_size, refit=not args.no_refit,
                  quantizer=args.quantizer, include=args.include, vocab=args.vocab,
                  vocab_include=args.vocab_include, device=args.device, svd=args.svd,
                  calib=getattr(args, "calib", ""),
                  calib_tokens=getattr(args, "calib_tokens", Config.calib_tokens))


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
                               progress=not args.quiet, overwrite=args.overwrite)
            print(summary.table())
            print(f"wrote {args.out}")
        elif command == "apply":
            apply(args.base, args.delta, args.out, args.device, progress=not args.quiet,
                  overwrite=args.overwrite)
            print(f"wrote {args.out}")
        elif command == "info":
            print(info(args.delta))
        elif command == "verify":
            print(verify(args.base, args.delta, args.merged, progress=not args.quiet))
        else:
            cfg = config_from_args(args)
            directory = Path(args.dir)
            check_replaceable(directory / "delta.safetensors", args.overwrite, is_delta_file,
                              "a delta file")
            check_replaceable(directory / "merged", args.overwrite, is_merged,
                              "a checkpoint written by apply")
            directory.mkdir(parents=True, exist_ok=True)
            t = time.perf_counter()
            base, ft = make_example(directory, args.model, args.layers, args.width,
                                    device=str(pick_device(cfg.device)), progress=not args.quiet,
                                    overwrite=args.overwrite)
            print(f"wrote example pair {base} and {ft} in {time.perf_counter() - t:.1f}s")
            if args.pair_only:
                return 0
            summary = compress(base, ft, directory / "delta.safetensors", cfg,
                               progress=not args.quiet, overwrite=args.overwrite)
            print(summary.table())
            print(info(directory / "delta.safetensors"))
            t = time.perf_counter()
            apply(base, directory / "delta.safetensors", directory / "merged", cfg.device,
                  progress=not args.quiet, overwrite=args.overwrite)
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
