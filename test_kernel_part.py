"""Tests of kernel.py: reference vs dense, Triton (interpreted on CPU) vs reference, and a
DeltaLinear-patched model vs the merged checkpoint.

The Triton kernels run here under TRITON_INTERPRET=1, which must be set before triton is
first imported; it only changes how @triton.jit functions run, so other tests are unaffected.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import kernel  # noqa: E402
from deltacome import (Band, CompressedMatrix, Config, apply, compress,  # noqa: E402
                       decompress_matrix, make_example, quantize_vectors, read_delta_file)

# Tolerances, as ‖y − y_ref‖ / ‖y_ref‖ (norm-wise: an elementwise relative error means
# nothing where outputs cancel to ~0):
# * Triton vs the exact product x·Δ̂ᵀ in float64: the kernel accumulates in fp32 with exact
#   products (codes, x and powers of two are exact in fp32/tf32) and rounds once, at the
#   output, to x.dtype: relative error ≈ unit roundoff u (fp16 2^-11 ≈ 4.9e-4, bf16 2^-8 ≈
#   3.9e-3) averaged over elements; we allow 2u.
# * Triton vs the reference in x.dtype: the reference also rounds Û, V̂, S, z and y to x.dtype,
#   so each side carries a few u; we allow 8u (fp16 3.9e-3, bf16 3.1e-2).
UNIT = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm()) if b.norm() > 0 else float(a.norm())


def random_matrix(out_f: int, in_f: int, ranks: dict[int, int], seed: int,
                  group_size: int = 128) -> CompressedMatrix:
    """A CompressedMatrix with the given {bits: rank} bands (widest first), random unit
    vectors and a decaying S: every code value and band mix, no SVD needed."""
    gen = torch.Generator().manual_seed(seed)
    bands, k = [], 0
    for bits, r in sorted(ranks.items(), reverse=True):
        if r == 0:
            continue
        U = torch.randn(r, out_f, generator=gen)
        V = torch.randn(r, in_f, generator=gen)
        U, V = U / U.norm(dim=1, keepdim=True), V / V.norm(dim=1, keepdim=True)
        S = 1.0 / (1.0 + torch.arange(k, k + r, dtype=torch.float32))
        bands.append(Band(bits, S, quantize_vectors(U, bits, group_size),
                          quantize_vectors(V, bits, group_size)))
        k += r
    return CompressedMatrix((out_f, in_f), "float16", bands)


def test_reference_matches_dense_product():
    """delta_matmul_reference in fp32 vs x·Δ̂ᵀ with Δ̂ from deltacome's decompress_matrix:
    the same sums in another order, so fp32 rounding only (≈1e-7 relative)."""
    cm = random_matrix(300, 257, {8: 2, 4: 5, 3: 4, 2: 30, 1: 9}, seed=1)
    x = torch.randn(5, 257, dtype=torch.float64)
    dense = x @ decompress_matrix(cm).double().mT                          # (5, 300)
    assert rel(kernel.delta_matmul_reference(x.float(), cm), dense) < 1e-5


def test_reference_empty_matrix_is_zero():
    cm = CompressedMatrix((7, 5), "float16", [])
    x = torch.randn(3, 5)
    assert torch.equal(kernel.delta_matmul_reference(x, cm), torch.zeros(3, 7))
    assert torch.equal(kernel.delta_matmul(x.half(), cm, backend="triton"),
                       torch.zeros(3, 7, dtype=torch.float16))


def check_triton(out_f, in_f, ranks, batch, dtype, splits, seed, group_size=128):
    cm = random_matrix(out_f, in_f, ranks, seed, group_size)
    x = torch.randn(batch, in_f, generator=torch.Generator().manual_seed(seed)).to(dtype)
    config = None if splits is None else kernel.KernelConfig(*splits,
                                                             block_o=math.gcd(group_size, 128))
    y = kernel.delta_matmul(x, kernel.prepare_delta(cm, "cpu"), backend="triton",
                            config=config)
    assert y.dtype == dtype and y.shape == (batch, out_f)
    exact = x.double() @ decompress_matrix(cm).double().mT
    ref = kernel.delta_matmul_reference(x, cm)
    if not cm.bands:
        assert not y.any()
        return
    assert torch.isfinite(y).all()
    assert rel(y, exact) < 2 * UNIT[dtype], (rel(y, exact), rel(ref, exact))
    assert rel(y, ref) < 8 * UNIT[dtype]


WIDTH_RANKS = st.dictionaries(st.sampled_from([1, 2, 3, 4, 8]), st.integers(0, 40),
                              min_size=1, max_size=3)


@settings(max_examples=25, deadline=None)
@given(out_f=st.integers(1, 300), in_f=st.integers(1, 300), ranks=WIDTH_RANKS,
       batch=st.integers(1, 5), bf16=st.booleans(),
       splits=st.one_of(st.none(), st.tuples(st.integers(1, 4), st.integers(1, 4))),
       seed=st.integers(0, 2**16))
@example(out_f=1, in_f=1, ranks={2: 1}, batch=1, bf16=False, splits=None, seed=0)
@example(out_f=129, in_f=127, ranks={8: 3, 3: 17, 2: 33}, batch=1, bf16=False,
         splits=(3, 2), seed=1)
@example(out_f=127, in_f=129, ranks={1: 40, 4: 0}, batch=5, bf16=True, splits=(2, 3), seed=2)
@example(out_f=300, in_f=257, ranks={8: 2, 2: 40}, batch=2, bf16=False, splits=(4, 4), seed=3)
def test_triton_matches_reference(out_f, in_f, ranks, batch, bf16, splits, seed):
    """Interpreted Triton kernels vs the float64 product and the reference, over awkward
    shapes (1, 127, 129, 257: not multiples of 16, 32, 128 or the tile widths), every width,
    ranks including 0 and 1, batch 1 (the FMA path) and 2–5 (the tl.dot path), and forced
    splits (the partial-sum + counter path)."""
    check_triton(out_f, in_f, ranks, batch, torch.bfloat16 if bf16 else torch.float16,
                 splits, seed)


@pytest.mark.parametrize("group_size", [32, 96])
def test_triton_other_group_sizes(group_size):
    """Group sizes that do not divide a 16-row block (96) or are smaller than it (32)."""
    check_triton(100, 300, {8: 2, 2: 20, 1: 10}, 1, torch.float16, (3, 2), 4, group_size)
    check_triton(100, 300, {4: 5, 2: 20}, 3, torch.float16, (2, 2), 5, group_size)


def test_triton_counters_reset_and_base_fused():
    """Two calls in a row on one prepared delta (the split counters must be back at 0),
    the fused base output, and leading batch dimensions."""
    cm = random_matrix(150, 200, {8: 2, 3: 6, 2: 20}, seed=6)
    kd = kernel.prepare_delta(cm, "cpu")
    x = torch.randn(2, 3, 200).half()
    base = torch.randn(2, 3, 150).half()
    config = kernel.KernelConfig(3, 4)
    for _ in range(2):
        y = kernel.delta_matmul(x, kd, base, backend="triton", config=config)
        assert not kd.locks.any()
    want = base.double() + x.double() @ decompress_matrix(cm).double().mT
    assert y.shape == (2, 3, 150) and rel(y, want) < 2 * UNIT[torch.float16]


def test_wrapper_errors():
    cm = random_matrix(10, 20, {2: 3}, seed=7)
    with pytest.raises(ValueError, match="expects"):
        kernel.delta_matmul(torch.randn(2, 21).half(), cm)
    with pytest.raises(ValueError, match="fp16 or bf16"):
        kernel.delta_matmul(torch.randn(2, 20), cm, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        kernel.delta_matmul(torch.randn(2, 20), cm, backend="cuda")
    with pytest.raises(ValueError, match="base"):
        kernel.delta_matmul(torch.randn(2, 20), cm, base=torch.randn(2, 11))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_patched_model_matches_merged(tmp_path, backend):
    """A Llama made from BASE and patched with DeltaLinear gives the merged model's logits.

    The merged checkpoint is fp16 (W_base + Δ̂ rounded once); the patched model keeps W_base
    in fp16 and adds the delta path in the compute dtype, so the two differ by fp16 weight
    rounding, ≈ 2^-11 relative per weight: logits agree to ~1e-3 relative; we allow 1e-2."""
    transformers = pytest.importorskip("transformers")
    base_dir, ft_dir = make_example(tmp_path / "pair", layers=1, width=64)
    compress(base_dir, ft_dir, tmp_path / "delta.safetensors", Config(device="cpu"),
             progress=False)
    apply(base_dir, tmp_path / "delta.safetensors", tmp_path / "merged", "cpu", progress=False)
    dtype = torch.float32 if backend == "reference" else torch.float16
    load = transformers.AutoModelForCausalLM.from_pretrained
    merged = load(tmp_path / "merged", dtype=dtype).eval()
    patched = load(base_dir, dtype=dtype).eval()
    names = kernel.patch_model(patched, tmp_path / "delta.safetensors", backend=backend)
    assert len(names) == 7 and all(isinstance(patched.get_submodule(n[:-7]), kernel.DeltaLinear)
                                   for n in names)
    ids = torch.randint(0, 512, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = merged(ids).logits.double()
        got = patched(ids).logits.double()
        unpatched = load(base_dir, dtype=dtype).eval()(ids).logits.double()
    assert rel(got, want) < 1e-2
    assert rel(got, want) < 0.1 * rel(unpatched, want)       # the delta path does matter


def test_patch_model_errors(tmp_path):
    base_dir, ft_dir = make_example(tmp_path / "pair", layers=1, width=64)
    compress(base_dir, ft_dir, tmp_path / "delta.safetensors", Config(device="cpu"),
             progress=False)
    model = torch.nn.Module()
    with pytest.raises(Exception, match="not in the model|no module"):
        kernel.patch_model(model, tmp_path / "delta.safetensors")
    assert read_delta_file(tmp_path / "delta.safetensors").matrices
