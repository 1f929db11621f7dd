"""Tests for deltacome: the quantizer's bounds, packing round trips, allocation invariants,
reconstruction bounds, the file format, the CLI end to end and its errors on bad input
(deltacome.py); the Triton kernels against their PyTorch reference and a patched model
against the merged one (kernel.py); the multi-tenant batched kernels and a model serving N
fine-tunes against each merged fine-tune (kernel.py, bench.py --tenants); baselines and the
evaluation pipeline (eval.py).

The Triton kernels run here under TRITON_INTERPRET=1 on CPU tensors. It must be set before
triton is first imported; it only changes how @triton.jit functions run.

Run: python -m pytest -q                        # the fast tests (pytest.ini leaves out slow)
     python -m pytest -q -m "slow or not slow"   # everything, as CI does
Model-level tests (tiny transformers models, the evaluation pipeline, subprocesses, a
benchmark), the longest Triton-interpreter runs and the wider parameter sweeps carry
@pytest.mark.slow (a parameter set: slow(...)).
"""

import os

os.environ["TRITON_INTERPRET"] = "1"
# One thread for torch and numpy (set before either loads): the tests' tensors are small, and
# waiting threads spin, which more than doubles the suite's time on a busy 2-core machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import deltacome as dc  # noqa: E402
import eval as ev  # noqa: E402
import kernel  # noqa: E402
from deltacome import (Band, CompressedMatrix, Config, DeltaComeError, apply,  # noqa: E402
                       compress, decompress_matrix, make_example, quantize_vectors,
                       read_delta_file, synthetic_delta)

SETTINGS = settings(deadline=None, max_examples=40,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


def slow(*values):
    """A parameter set that only the slow run takes (pytest.ini): the wider sweeps."""
    return pytest.param(*values, marks=pytest.mark.slow)


def long_tailed(out_f, in_f, seed=0, alpha=1.0):
    return dc.synthetic_delta(out_f, in_f, torch.Generator().manual_seed(seed), alpha=alpha)


# ---------------------------------------------------------------------------------------------
# Group quantizer and packing.

@SETTINGS
@given(n=st.integers(1, 1000), m=st.integers(1, 4), bits=st.integers(1, 8),
       group=st.sampled_from([32, 64, 128]), seed=st.integers(0, 2**31 - 1),
       spread=st.sampled_from([1e-4, 1.0, 100.0]), offset=st.sampled_from([0.0, 0.5, -3.0]))
@example(n=1, m=1, bits=2, group=128, seed=0, spread=1.0, offset=0.0)
@example(n=127, m=2, bits=3, group=128, seed=1, spread=1.0, offset=0.0)
@example(n=128, m=2, bits=8, group=128, seed=2, spread=1.0, offset=0.5)
@example(n=129, m=3, bits=4, group=128, seed=3, spread=1e-4, offset=-3.0)
@example(n=1000, m=1, bits=1, group=128, seed=4, spread=100.0, offset=0.0)
def test_quantize_error_within_half_scale(n, m, bits, group, seed, spread, offset):
    x = torch.randn(m, n, generator=torch.Generator().manual_seed(seed)) * spread + offset
    codes, scale, zero = dc.quantize_groups(x, bits, group)
    assert codes.shape == (m, n) and scale.shape == zero.shape == (m, -(-n // group))
    assert int(codes.max()) <= 2**bits - 1
    xhat = dc.dequantize_groups(codes, scale, zero, group)
    half = scale.float().repeat_interleave(group, 1)[:, :n] / 2
    # The bound is exact in real arithmetic; dequantization q·s + z in fp32 adds at most a few
    # ulps of |x|, hence the 4·2^-24·|x| slack (about 2.4e-7 relative).
    assert ((x - xhat).abs() <= half + 4 * 2**-24 * x.abs().clamp_min(1)).all()


@SETTINGS
@given(n=st.integers(1, 600), bits=st.integers(1, 8), seed=st.integers(0, 2**31 - 1),
       heavy=st.booleans())
@example(n=1, bits=1, seed=0, heavy=False)
@example(n=129, bits=2, seed=1, heavy=True)
def test_search_never_worse_than_minmax(n, bits, seed, heavy):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, n, generator=gen)
    if heavy:                                     # a few outliers: where clipping pays most
        x = x * torch.where(torch.rand(3, n, generator=gen) < 0.02, 10.0, 1.0)
    group_err = {}
    for search in (False, True):
        codes, scale, zero = dc.quantize_groups(x, bits, 128, search)
        assert int(codes.max()) <= 2**bits - 1 and scale.dtype == zero.dtype == torch.float16
        err = (dc.dequantize_groups(codes, scale, zero) - x) ** 2
        group_err[search] = torch.nn.functional.pad(err, (0, -n % 128)).view(3, -1, 128).sum(-1)
    assert (group_err[True] <= group_err[False] * (1 + 1e-6) + 1e-12).all()


def test_search_halves_two_bit_error_of_unit_vectors():
    x = torch.linalg.qr(torch.randn(2048, 64, generator=torch.Generator().manual_seed(0)))[0].mT
    mse = [float(((dc.dequantize_vectors(dc.quantize_vectors(x, 2, search=s)) - x) ** 2).sum())
           for s in (False, True)]
    assert mse[1] < 0.6 * mse[0]


@pytest.mark.parametrize("bits", range(1, 9))
def test_constant_groups_stay_finite_and_tight(bits):
    # max == min: the range is only the fp16 rounding of `zero`, so scale ≤ one fp16 ulp.
    x = torch.full((2, 200), 0.1234)
    codes, scale, zero = dc.quantize_groups(x, bits)
    assert (scale.float() <= 2**-13).all()
    assert torch.allclose(dc.dequantize_groups(codes, scale, zero), x, rtol=0, atol=2**-14)


@SETTINGS
@given(n=st.integers(1, 700), m=st.integers(1, 5), bits=st.integers(1, 8),
       seed=st.integers(0, 2**31 - 1))
@example(n=1, m=1, bits=8, seed=0)
@example(n=33, m=1, bits=1, seed=0)
@example(n=129, m=2, bits=3, seed=0)
def test_pack_unpack_round_trip(n, m, bits, seed):
    codes = torch.randint(0, 2**bits, (m, n), generator=torch.Generator().manual_seed(seed),
                          dtype=torch.int64).to(torch.uint8)
    codes[0, 0] = 2**bits - 1                      # the top bit of a word must survive int32
    packed = dc.pack_codes(codes, bits)
    per_word = 32 // dc.container_bits(bits)
    assert packed.dtype == torch.int32 and packed.shape == (m, -(-n // per_word))
    assert torch.equal(dc.unpack_codes(packed, bits, n), codes)


def test_packing_layout_is_lsb_first():
    codes = torch.tensor([[1, 2, 3, 0, 3]], dtype=torch.uint8)     # 2-bit: 16 per word
    assert dc.pack_codes(codes, 2).tolist() == [[1 | 2 << 2 | 3 << 4 | 3 << 8]]
    assert dc.container_bits(3) == 4 and dc.container_bits(5) == 8 and dc.container_bits(1) == 1


def test_vector_bytes_matches_stored_bytes():
    delta = long_tailed(300, 200, seed=5)
    cm = dc.compress_matrix(delta, dc.Config(budget=1 / 8))
    expected = sum(b.rank * dc.vector_bytes(300, 200, b.bits) for b in cm.bands)
    assert cm.nbytes() == expected


# ---------------------------------------------------------------------------------------------
# Allocation.

@SETTINGS
@given(out_f=st.integers(16, 300), in_f=st.integers(16, 300), seed=st.integers(0, 1000),
       budget=st.sampled_from([1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4]),
       alpha=st.sampled_from([0.5, 1.0, 2.0]))
@example(out_f=256, in_f=256, seed=0, budget=1 / 16, alpha=1.0)
def test_allocation_fits_budget_and_is_monotone(out_f, in_f, seed, budget, alpha):
    delta = long_tailed(out_f, in_f, seed, alpha)
    cfg = dc.Config(budget=budget)
    limit = dc.budget_bytes(out_f, in_f, budget)
    if limit < dc.vector_bytes(out_f, in_f, 2):
        with pytest.raises(dc.DeltaComeError, match="less than one singular vector"):
            dc.compress_matrix(delta, cfg)
        return
    for method in ("greedy", "paper", "4:3,2:*"):
        cm = dc.compress_matrix(delta, dc.Config(budget=budget, method=method))
        assert 0 < cm.nbytes() <= limit
        bits = [b.bits for b in cm.bands]
        assert bits == sorted(bits, reverse=True) and len(set(bits)) == len(bits)


def test_allocate_bits_prefers_large_singular_values():
    S = torch.tensor([10.0, 5.0, 1.0, 0.1])
    eps = torch.tensor([[1, 0.1, 0.01]] * 4, dtype=torch.float64)
    widths = dc.allocate_bits(S, eps, costs=[0, 10, 40], widths=[0, 2, 8], budget=70)
    assert widths == [8, 2, 2, 2]          # 8 bits where S² pays for it, never more than 70 bytes


@pytest.mark.parametrize("method", ["1:*", "8:3,1:*", "2:5"])
def test_band_specs_narrower_than_greedy_candidates(method):
    delta = long_tailed(200, 150, seed=4)
    cm = dc.compress_matrix(delta, dc.Config(method=method, budget=1 / 16))
    spec = dc.parse_bands(method)
    assert [b.bits for b in cm.bands] == [bits for bits, _ in spec]
    assert 0 < cm.nbytes() <= dc.budget_bytes(200, 150, 1 / 16)
    assert dc.relative_error(delta, dc.decompress_matrix(cm)) < 1


def test_band_spec_parsing():
    assert dc.parse_bands("8:2,3:32,2:*") == [(8, 2), (3, 32), (2, None)]
    for bad in ("8", "9:2", "2:x", "2:-1"):
        with pytest.raises(dc.DeltaComeError):
            dc.parse_bands(bad)


# ---------------------------------------------------------------------------------------------
# Reconstruction.

@settings(deadline=None, max_examples=12)
@given(out_f=st.integers(40, 260), in_f=st.integers(40, 260), seed=st.integers(0, 1000))
def test_reconstruction_bounds(out_f, in_f, seed):
    delta = long_tailed(out_f, in_f, seed)
    cm = dc.compress_matrix(delta, dc.Config(budget=1 / 8))
    err = (delta - dc.decompress_matrix(cm)).norm()
    # Eckart–Young: no matrix of rank r beats dropping the tail after the top r triplets.
    r = sum(b.rank for b in cm.bands)
    S = torch.linalg.svdvals(delta.double())
    assert err >= S[r:].norm() * (1 - 1e-4)
    # Keeping the last (lowest-precision) band must beat dropping it.
    without_tail = dc.CompressedMatrix(cm.shape, cm.dtype, cm.bands[:-1])
    assert err <= (delta - dc.decompress_matrix(without_tail)).norm()


def test_error_decreases_with_budget():
    delta = long_tailed(512, 384, seed=1)
    errors = [dc.relative_error(delta, dc.decompress_matrix(
        dc.compress_matrix(delta, dc.Config(budget=b)))) for b in (1 / 64, 1 / 32, 1 / 16, 1 / 8)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.5 * errors[0]


@pytest.mark.parametrize("budget, alpha", [            # 1/16 at alpha 0.7 in the fast tests
    (b, a) if (b, a) == (1 / 16, 0.7) else slow(b, a)
    for b in (1 / 32, 1 / 16, 1 / 8) for a in (0.7, 1.0, 1.5)])
def test_greedy_beats_paper_preset(budget, alpha):
    delta = long_tailed(512, 512, seed=2, alpha=alpha)

    def err(method, refit=True, quantizer="mse"):
        cfg = dc.Config(budget=budget, method=method, refit=refit, quantizer=quantizer)
        return dc.relative_error(delta, dc.decompress_matrix(dc.compress_matrix(delta, cfg)))
    assert err("greedy") <= err("paper")
    assert err("greedy", refit=False) <= err("paper", refit=False)
    assert err("greedy") <= err("greedy", quantizer="minmax")


def test_refit_does_not_hurt():
    delta = long_tailed(384, 256, seed=3)
    with_refit, without = (dc.relative_error(delta, dc.decompress_matrix(dc.compress_matrix(
        delta, dc.Config(refit=r)))) for r in (True, False))
    assert with_refit <= without


@pytest.mark.parametrize("svd", ["gram", "full", "lowrank"])
def test_low_rank_delta_is_nearly_exact(svd):
    # A LoRA-merged fine-tune: rank 4. The budget could hold far more vectors than exist.
    gen = torch.Generator().manual_seed(0)
    delta = 0.01 * torch.randn(200, 4, generator=gen) @ torch.randn(4, 300, generator=gen)
    cm = dc.compress_matrix(delta, dc.Config(svd=svd))
    assert cm.bands[0].bits == 8 and cm.bands[0].rank >= 4     # the 4 real directions
    assert dc.relative_error(delta, dc.decompress_matrix(cm)) < 0.01     # 8-bit rounding


def test_zero_delta_is_an_empty_entry():
    cm = dc.compress_matrix(torch.zeros(64, 48), dc.Config())
    assert cm.bands == [] and cm.nbytes() == 0
    assert torch.equal(dc.decompress_matrix(cm), torch.zeros(64, 48))


def test_budget_too_small_is_an_error():
    with pytest.raises(dc.DeltaComeError, match="less than one singular vector"):
        dc.compress_matrix(long_tailed(64, 64), dc.Config(budget=1 / 1000))


# ---------------------------------------------------------------------------------------------
# Checkpoints, file format and CLI.

def run_cli(*args):
    """Run deltacome.main in-process: (exit code, stderr text)."""
    import contextlib
    import io
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = dc.main([str(a) for a in args] + ["--quiet"] * (args[0] != "info"))
    return code, err.getvalue()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    sharded = dc.make_example(root / "sharded", layers=2, width=128, sharded=True)
    single = dc.make_example(root / "single", layers=1, width=96, sharded=False,
                             dtype=torch.bfloat16)
    return {"sharded": sharded, "single": (sharded[0].parent.parent / "single" / "base"
                                           / "model.safetensors",
                                           single[1] / "model.safetensors")}


@pytest.mark.parametrize("layout", ["sharded", "single"])
def test_cli_compress_info_apply(pair, tmp_path, layout, monkeypatch):
    base, ft = pair[layout]
    out = tmp_path / "delta.safetensors"
    assert run_cli(base, ft, out) == (0, "")
    d = dc.read_delta_file(out)
    assert d.meta["version"] == dc.FORMAT_VERSION and d.meta["group_size"] == 128
    base_r, ft_r = dc.CheckpointReader(base), dc.CheckpointReader(ft)
    compressed = [n for n in base_r.names() if ".layers." in n and base_r.get(n).ndim == 2]
    assert sorted(d.matrices) == sorted(compressed)
    for name, cm in d.matrices.items():
        assert cm.nbytes() <= dc.budget_bytes(*cm.shape, 1 / 16)
    # Carried tensors are FT's, bit-exact; unchanged ones (the embedding here) are not stored.
    for name in base_r.names():
        if name not in d.matrices and not torch.equal(base_r.get(name), ft_r.get(name)):
            assert torch.equal(d.carried[name], ft_r.get(name))
    assert "model.embed_tokens.weight" not in d.carried

    assert run_cli("info", out)[0] == 0
    merged = tmp_path / "merged"
    assert run_cli("apply", base, out, merged) == (0, "")
    if layout == "sharded":
        assert {p.name for p in merged.iterdir()} == {p.name for p in base.iterdir()}
        assert json.loads((merged / "config.json").read_text()) == \
            json.loads((base / "config.json").read_text())
    merged_r = dc.CheckpointReader(merged)
    for name in base_r.names():
        w = merged_r.get(name)
        assert w.dtype == base_r.get(name).dtype
        if name in d.matrices:       # W_base + Δ̂, computed independently of apply
            expected = (base_r.get(name).float() + dc.decompress_matrix(d.matrices[name]))
            assert torch.equal(w, expected.to(w.dtype))
        else:
            assert torch.equal(w, ft_r.get(name))
    assert not list(tmp_path.glob(".*")), "scratch files left behind"
    assert run_cli("verify", base, out, merged) == (0, "")
    # verify catches a tampered checkpoint
    tampered = dc.read_delta_file(out)
    name = next(iter(tampered.matrices))
    tampered.matrices[name].bands[0].S *= 1.01
    monkeypatch.setattr(dc, "read_delta_file", lambda path: tampered)
    with pytest.raises(dc.DeltaComeError, match="ulp"):
        dc.verify(base, out, merged, progress=False)


def test_cli_methods_and_budgets(pair, tmp_path):
    base, ft = pair["sharded"]
    for extra in (["--method", "paper"], ["--method", "8:1,2:*", "--budget", "1/8"],
                  ["--budget", "0.03", "--widths", "1,2,4", "--no-refit"],
                  ["--svd", "lowrank"], ["--svd", "gram"],
                  ["--quantizer", "minmax", "--group-size", "64"]):
        out = tmp_path / "d.safetensors"
        assert run_cli(base, ft, out, *extra) == (0, ""), extra
        budget = dc.read_delta_file(out).meta["config"]["budget"]
        for cm in dc.read_delta_file(out).matrices.values():
            assert cm.nbytes() <= dc.budget_bytes(*cm.shape, budget)


def corrupt(src_dir, dst_dir, fn):
    """Copy a single-file checkpoint, then let fn(tensors) change it."""
    tensors = load_file(str(src_dir / "model.safetensors"))
    fn(tensors)
    dst_dir.mkdir()
    save_file(tensors, str(dst_dir / "model.safetensors"))
    return dst_dir


def first_matrix(t):
    return next(k for k in t if ".layers." in k and t[k].ndim == 2)


BAD_FT = {
    "NaN": (lambda t: t[first_matrix(t)].view(-1).__setitem__(3, float("nan")), "NaN or Inf"),
    "Inf": (lambda t: t[first_matrix(t)].view(-1).__setitem__(0, float("inf")), "NaN or Inf"),
    "missing": (lambda t: t.pop(first_matrix(t)), "missing in FT"),
    "extra": (lambda t: t.__setitem__("model.extra.weight", torch.ones(2)), "not in BASE"),
    "shape": (lambda t: t.__setitem__(first_matrix(t), t[first_matrix(t)][:-1].clone()),
              "shape"),
    "dtype": (lambda t: t.__setitem__(first_matrix(t), t[first_matrix(t)].to(torch.int16)),
              "dtype"),
}


@pytest.mark.parametrize("case", sorted(BAD_FT))
def test_bad_fine_tune_is_a_one_line_error(pair, tmp_path, case):
    base, ft = pair["sharded"][0].parent.parent / "single" / "base", None
    ft = corrupt(base.parent / "ft", tmp_path / "ft", BAD_FT[case][0])
    out = tmp_path / "delta.safetensors"
    code, err = run_cli(base, ft, out)
    assert code == 2 and BAD_FT[case][1] in err and err.count("\n") == 1, err
    assert not out.exists() and not list(tmp_path.glob(".delta*"))


def test_bad_files_are_one_line_errors(pair, tmp_path):
    base, ft = pair["sharded"]
    truncated = tmp_path / "truncated.safetensors"
    shard = sorted(base.glob("model-*.safetensors"))[0]
    data = shard.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 100)
    out = tmp_path / "delta.safetensors"
    cases = [((tmp_path / "nope", ft, out), "no such file"),
             ((truncated, truncated, out), "not a readable safetensors file"),
             ((garbage, garbage, out), "not a readable safetensors file"),
             ((base, ft, tmp_path / "no" / "dir" / "d.safetensors"), "does not exist"),
             ((base, ft, out, "--budget", "1/100000"), "less than one singular vector"),
             (("info", garbage), "not a readable safetensors file"),
             (("info", shard), "not a deltacome file"),
             (("apply", tmp_path / "nope", out, tmp_path / "m"), "no such file")]
    for args, message in cases:
        code, err = run_cli(*args)
        assert code == 2 and message in err and err.count("\n") == 1, (args, err)
    assert not out.exists() and not (tmp_path / "m").exists()


def test_unwritable_output(pair):
    # /proc refuses new files even to root, so this is a real failed write on any Linux.
    base, ft = pair["sharded"]
    code, err = run_cli(base, ft, "/proc/deltacome-test.safetensors")
    assert code == 2 and "/proc" in err and err.count("\n") == 1, err


def test_unwritable_output_checked_before_work(pair, tmp_path, monkeypatch):
    # Root ignores permission bits, so also test the check itself with os.access patched.
    base, ft = pair["sharded"]
    monkeypatch.setattr(dc.os, "access", lambda path, mode: False)
    code, err = run_cli(base, ft, tmp_path / "d.safetensors")
    assert code == 2 and "not writable" in err and not (tmp_path / "d.safetensors").exists()


def test_failure_midway_leaves_no_output(pair, tmp_path, monkeypatch):
    base, ft = pair["sharded"]
    out = tmp_path / "delta.safetensors"
    calls = []

    def failing(delta, cfg, dtype):
        calls.append(1)
        if len(calls) == 3:
            raise dc.DeltaComeError("simulated failure")
        return original(delta, cfg, dtype)
    original = dc.compress_matrix
    monkeypatch.setattr(dc, "compress_matrix", failing)
    assert run_cli(base, ft, out)[0] == 2
    assert list(tmp_path.iterdir()) == []


def test_zero_delta_checkpoint(pair, tmp_path):
    base, _ = pair["sharded"]
    out = tmp_path / "delta.safetensors"
    assert run_cli(base, base, out) == (0, "")
    d = dc.read_delta_file(out)
    assert d.matrices and all(cm.bands == [] for cm in d.matrices.values()) and not d.carried


@pytest.mark.slow
def test_cli_subprocess_example_and_error(tmp_path):
    """The real command line: the README's example works, and a bad input has no traceback."""
    script = Path(dc.__file__)
    done = subprocess.run([sys.executable, script, "example", tmp_path / "demo", "-q"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "ratio" in done.stdout and (tmp_path / "demo" / "merged").is_dir()
    bad = subprocess.run([sys.executable, script, tmp_path / "x", tmp_path / "y",
                          tmp_path / "z"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().count("\n") == 0


def test_streaming_reader_holds_one_shard(pair):
    base, _ = pair["sharded"]
    reader = dc.CheckpointReader(base)
    names = reader.names()
    assert len(set(reader.files.values())) == 3          # one shard per layer + the rest
    for name in names:
        assert reader.get(name).numel() > 0
    reader.close()


def test_example_delta_is_long_tailed():
    S = torch.linalg.svdvals(long_tailed(256, 256))
    energy = (S**2).cumsum(0) / (S**2).sum()
    assert energy[15] > 0.8 and math.isclose(float(energy[-1]), 1.0, rel_tol=1e-5)


# =============================================================================================
# kernel.py: reference vs dense, Triton (interpreted on CPU) vs reference, patched vs merged.

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


def assert_workspace_clean():
    """Between launches the phase-U partial sums and the tile counters must be zero, and
    so must the z buffer the next launch's phase V adds into (the other one may hold what
    the last launch's phase V added; its phase U zeroes it)."""
    acc, locks, z_size = kernel.workspace("cpu", 0, 0, 0)
    turn = int(locks[0]) % 2
    assert not acc[2 * z_size:].any() and not locks[kernel.Z_STATE:].any()
    assert not acc[turn * z_size:(turn + 1) * z_size].any()


def small_config(split_v, chunks_u):
    """Tiles small enough that the test shapes (≤ 300) span several of them."""
    return kernel.KernelConfig(split_v, 16 * chunks_u, block_j=16, block_o=64)


def dot_units(batch, config):
    """The error bound vs the exact product in units of the output dtype: 2, or 3 where
    phase U runs an fp16 dot (z·scale rounded to fp16 adds one)."""
    fp16_dot = config is not None and config.u_fp16 and config.rows(batch) > kernel.FMA_ROWS
    return 3 if fp16_dot else 2


def check_triton(out_f, in_f, ranks, batch, dtype, splits, seed, group_size=128):
    cm = random_matrix(out_f, in_f, ranks, seed, group_size)
    x = torch.randn(batch, in_f, generator=torch.Generator().manual_seed(seed)).to(dtype)
    config = None if splits is None else small_config(*splits)
    y = kernel.delta_matmul(x, kernel.prepare_delta(cm, "cpu"), backend="triton",
                            config=config)
    assert y.dtype == dtype and y.shape == (batch, out_f)
    exact = x.double() @ decompress_matrix(cm).double().mT
    ref = kernel.delta_matmul_reference(x, cm)
    if not cm.bands:
        assert not y.any()
        return
    assert torch.isfinite(y).all()
    assert rel(y, exact) < dot_units(batch, config) * UNIT[dtype], (rel(y, exact),
                                                                     rel(ref, exact))
    # The fp16/bf16 reference can itself be off (one output with cancellation: 6.7e-3).
    assert rel(y, ref) < 8 * UNIT[dtype] + rel(ref, exact)


WIDTH_RANKS = st.dictionaries(st.sampled_from([1, 2, 3, 4, 8]), st.integers(0, 40),
                              min_size=1, max_size=3)


@settings(max_examples=25, deadline=None)
@given(out_f=st.integers(1, 300), in_f=st.integers(1, 300), ranks=WIDTH_RANKS,
       batch=st.integers(1, 5), bf16=st.booleans(),
       splits=st.one_of(st.none(), st.tuples(st.integers(1, 4), st.integers(1, 4))),
       seed=st.integers(0, 2**16))
@example(out_f=1, in_f=1, ranks={2: 1}, batch=1, bf16=False, splits=None, seed=0)
@example(out_f=1, in_f=42, ranks={4: 25}, batch=1, bf16=False, splits=None, seed=0)
@example(out_f=129, in_f=127, ranks={8: 3, 3: 17, 2: 33}, batch=1, bf16=False,
         splits=(3, 2), seed=1)
@example(out_f=127, in_f=129, ranks={1: 40, 4: 0}, batch=5, bf16=True, splits=(2, 3), seed=2)
@example(out_f=300, in_f=257, ranks={8: 2, 2: 40}, batch=2, bf16=False, splits=(4, 4), seed=3)
@example(out_f=200, in_f=150, ranks={8: 40, 2: 30}, batch=1, bf16=False, splits=(2, 2), seed=4)
@example(out_f=200, in_f=150, ranks={8: 40, 2: 30}, batch=3, bf16=True, splits=(1, 3), seed=5)
@example(out_f=129, in_f=257, ranks={8: 3, 3: 17, 1: 33}, batch=2, bf16=True, splits=(3, 2),
         seed=6)
def test_triton_matches_reference(out_f, in_f, ranks, batch, bf16, splits, seed):
    """Interpreted Triton kernels vs the float64 product and the reference, over awkward
    shapes (1, 127, 129, 257: not multiples of 16, 32, 128 or the tile widths), every width,
    ranks including 0 and 1, batch 1–5 (1, and 2 under a forced config: the FMA path; 2 at
    these small shapes by default, and 3–5: the tl.dot path), and forced splits (the
    partial-sum + counter path; an 8-bit band of rank 40 in items of 16 vectors beside a
    2-bit band in items of 32 or 48)."""
    check_triton(out_f, in_f, ranks, batch, torch.bfloat16 if bf16 else torch.float16,
                 splits, seed)


@pytest.mark.parametrize("group_size", [slow(32), 96])
def test_triton_other_group_sizes(group_size):
    """Group sizes that do not divide a 16-row block (96) or are smaller than it (32)."""
    check_triton(100, 300, {8: 2, 2: 20, 1: 10}, 1, torch.float16, (3, 2), 4, group_size)
    check_triton(100, 300, {4: 5, 2: 20}, 3, torch.float16, (2, 2), 5, group_size)


@pytest.mark.parametrize("dtype, x_scale, s_scale", [
    (torch.float16, 2.0**-12, 1.0), slow(torch.float16, 2.0**6, 1.0),
    slow(torch.float16, 1.0, 2.0**-12), slow(torch.float16, 1.0, 2.0**6),
    slow(torch.bfloat16, 2.0**-50, 1.0), slow(torch.bfloat16, 2.0**38, 1.0),
    slow(torch.bfloat16, 1.0, 2.0**-30), (torch.bfloat16, 1.0, 2.0**30)])
def test_triton_exact_across_magnitudes(dtype, x_scale, s_scale):
    """Batch 1 and 2 take codes as fp32 denormals times x or z·scale lifted by powers of two
    (_code_denormals), batch 3 an fp16 dot of z·scale lifted per row (_row_lift): still
    within rounding of the exact product for inputs far from 1, inside the documented range
    of batch 1–2 (2^-62 ≤ |x| < 2^43, 2^-41 ≤ |z·scale| < 2^64), each row of a batch
    against its own exact product."""
    cm = random_matrix(130, 200, {8: 3, 4: 5, 2: 20, 1: 8}, seed=21)
    for band in cm.bands:
        band.S.mul_(s_scale)
    kd = kernel.prepare_delta(cm, "cpu")
    x = (torch.randn(3, 200, generator=torch.Generator().manual_seed(21)) * x_scale).to(dtype)
    x[1] *= 2                                   # batch 2 on the FMA path: rows of their own
    config = small_config(2, 2)
    for rows in (x[:1], x[:2], x):
        y = kernel.delta_matmul(rows, kd, backend="triton", config=config)
        exact = rows.double() @ decompress_matrix(cm).double().mT
        bound = dot_units(rows.shape[0], config) * UNIT[dtype]
        for i in range(rows.shape[0]):
            assert torch.isfinite(y[i]).all() and rel(y[i], exact[i]) < bound, i


@pytest.mark.parametrize("block_o", [512, slow(1024)])
def test_triton_phase_u_tiles_of_large_shapes(block_o):
    """The batch-1 phase-U tiles of real shapes (512 and 1024 outputs: slots of 16 and 32
    outputs a thread, 16 at 8 bits), over a tile and a half with every width, split into
    items: against the float64 product."""
    cm = random_matrix(block_o * 3 // 2 + 5, 96, {8: 3, 4: 9, 3: 4, 2: 20, 1: 6}, seed=23)
    x = torch.randn(1, 96, generator=torch.Generator().manual_seed(23)).half()
    config = kernel.KernelConfig(2, 16, block_j=16, block_o=block_o)
    y = kernel.delta_matmul(x, kernel.prepare_delta(cm, "cpu"), backend="triton",
                            config=config)
    exact = x.double() @ decompress_matrix(cm).double().mT
    assert rel(y, exact) < 2 * UNIT[torch.float16], rel(y, exact)
    assert_workspace_clean()


def fake_delta(out_f, in_f, rank, tenants=1):
    """What choose_config reads of a KernelDelta: one 2-bit band of `rank` a tenant."""
    return SimpleNamespace(shape=(out_f, in_f), group_size=128, max_rank=rank,
                           bands=[[[2, rank]]] * tenants,
                           device_bytes=(rank * (out_f + in_f) // 4,) * tenants)


def test_choose_config_phase_u_tile():
    """1024-output phase-U tiles, or 512 where 1024 would leave fewer than 2 programs per
    SM (a 4096×4096 delta of rank 616 on 132 SMs); at least 16 vectors per item."""
    small = kernel.choose_config(fake_delta(4096, 4096, 616), 1, 132)
    large = kernel.choose_config(fake_delta(28672, 8192, 1921), 1, 132)
    assert (small.block_o, small.rows_u) == (512, 16)
    assert (large.block_o, large.rows_u) == (1024, 32)
    assert kernel.choose_config(fake_delta(4096, 4096, 616), 1, 132, block_o=1024).block_o \
        == 1024


def test_choose_config_phase_v_tile():
    """FMA-path phase-V tiles of 64 vectors, or 32 where 64-vector tiles of one group each
    would fill less than half the grid (16 programs per SM): 4096 inputs are 32 groups."""
    assert kernel.choose_config(fake_delta(4096, 4096, 616), 1, 132).block_j == 32   # 320
    assert kernel.choose_config(fake_delta(4096, 4096, 616), 2, 132).block_j == 32
    assert kernel.choose_config(fake_delta(4096, 11008, 900), 1, 132).block_j == 64  # 1290
    assert kernel.choose_config(fake_delta(28672, 8192, 1921), 1, 132).block_j == 64
    assert kernel.choose_config(fake_delta(4096, 4096, 616), 1, 132, block_j=64).block_j == 64


def test_choose_config_phase_u_dot_precision():
    """The tl.dot path's phase U runs an fp16 dot from 8192 outputs up and tf32 below; both
    match the float64 product on the same delta."""
    assert kernel.choose_config(fake_delta(8192, 28672, 1921), 16, 132).u_fp16
    assert not kernel.choose_config(fake_delta(4096, 11008, 900), 16, 132).u_fp16
    assert not kernel.choose_config(fake_delta(8192, 8192, 1000), 16, 132, u_fp16=False).u_fp16
    cm = random_matrix(200, 150, {8: 5, 3: 20, 2: 40}, seed=24)
    kd = kernel.prepare_delta(cm, "cpu")
    x = torch.randn(5, 150, generator=torch.Generator().manual_seed(24)).half()
    exact = x.double() @ decompress_matrix(cm).double().mT
    for fp16 in (True, False):
        config = kernel.KernelConfig(2, 32, u_fp16=fp16)
        y = kernel.delta_matmul(x, kd, backend="triton", config=config)
        assert rel(y, exact) < dot_units(5, config) * UNIT[torch.float16], (fp16, rel(y, exact))


def test_choose_config_stages():
    """A single delta at batch 1 pipelines phase U 4 deep up to 16 MB and phase V 2 deep
    above; batch 2 and tenant launches keep 1 and 3 stages."""
    def stages(kd, block_b, **kw):
        cfg = kernel.choose_config(kd, block_b, 132, **kw)
        return cfg.v_stages, cfg.u_stages
    small, large = fake_delta(4096, 4096, 616), fake_delta(28672, 8192, 1921)   # 1.3, 18 MB
    assert stages(small, 1) == (1, 4) and stages(large, 1) == (2, 3)
    assert stages(small, 2) == (1, 3) and stages(large, 2) == (1, 3)
    assert stages(fake_delta(4096, 4096, 616, tenants=4), 1, n_seg=4) == (1, 3)
    assert stages(small, 1, v_stages=3, u_stages=2) == (3, 2)


def test_u_items_cover_each_band_once():
    """Phase-U items: every tile covers each band's vectors once, in chunks of `rows`
    vectors, 8-bit bands in chunks of half as many (a multiple of 16)."""
    kd = kernel.prepare_delta(random_matrix(100, 64, {8: 40, 3: 50, 2: 70}, 7), "cpu")
    rank = {8: 40, 4: 50, 2: 70}                    # by container width (3 bits in 4)
    for rows in (16, 32, 48, 64):
        table, n, tiles = kd.u_items(64, rows)
        spans = {}
        for c, _, _, r, tile, lo, hi, *_ in table[:n].tolist():
            assert r == rank[c]
            assert 0 < hi - lo <= (rows if c < 8 else max(16, rows // 32 * 16))
            spans.setdefault((tile, c), []).append((lo, hi))
        assert len(spans) == 3 * tiles
        for (_, c), s in spans.items():
            s = sorted(s)
            assert s[0][0] == 0 and s[-1][1] == rank[c]
            assert all(a[1] == b[0] and a[0] % 16 == 0 for a, b in zip(s, s[1:]))


def test_rows_fma_or_dot_path():
    """A plan pads 1 and 2 rows to themselves and longer segments to 16 or 32; a 2-row
    segment takes the FMA path from 4096 outputs up and is padded to 16 for tl.dot below."""
    rows = (1, 2, 3, 4, 16, 17, 32)
    assert [kernel.block_rows(n) for n in rows] == [1, 2, 16, 16, 16, 32, 32]
    assert {bb for bb, _, _ in kernel.plan_tenants([0, 1, 1], 2, "cpu").groups} == {1, 2}
    kd = fake_delta(4096, 4096, 616)
    large = kernel.choose_config(kd, 2, 132)
    small = kernel.choose_config(fake_delta(1024, 4096, 616), 2, 132)
    assert [large.rows(b) for b in (1, 2, 16, 32)] == [1, 2, 16, 32]
    assert [small.rows(b) for b in (1, 2, 16, 32)] == [1, 16, 16, 32]
    assert large.block_o == kernel.choose_config(kd, 1, 132).block_o // 2
    assert small.tiles(small.rows(2), 128) == large.tiles(16, 128)


def test_v_items_cover_each_tile_once():
    """Phase-V items: every tile of block_j vectors covers the groups once, in `split`
    chunks, 8-bit bands in chunks of half as many groups (rounded up)."""
    kd = kernel.prepare_delta(random_matrix(64, 1000, {8: 40, 3: 50, 2: 70}, 8), "cpu")
    n_groups = -(-1000 // 128)                                   # 8
    for split in (1, 2, 3, 8):
        per = -(-n_groups // split)
        table, n, _ = kd.v_items(16, split)
        spans = {}
        for c, _, _, r, col0, lo, hi, _, _, _, tile, count, *_ in table[:n].tolist():
            assert 0 < hi - lo <= (per if c < 8 else -(-per // 2))
            spans.setdefault((c, col0, tile, count), []).append((lo, hi))
        assert sum(-(-r // 16) for r in (40, 50, 70)) == len({t for _, _, t, _ in spans})
        for (_, _, _, count), s in spans.items():
            s = sorted(s)
            assert len(s) == count and s[0][0] == 0 and s[-1][1] == n_groups
            assert all(a[1] == b[0] for a, b in zip(s, s[1:]))


def test_choose_config_next_kernel_start():
    """A one-round grid lets the next kernel start after the main loop; tenant segments that
    read more than 64 MB between them on the FMA path (64 programs per SM, several rounds)
    let it start at once."""
    shape = fake_delta(4096, 4096, 616, tenants=64)                 # 1.26 MB a tenant
    assert not kernel.choose_config(shape, 1, 132).early_next
    assert not kernel.choose_config(shape, 16, 132, n_seg=64).early_next
    assert kernel.choose_config(shape, 1, 132, n_seg=64).waves == 64
    assert kernel.choose_config(shape, 2, 132, n_seg=64).early_next
    assert kernel.choose_config(shape, 1, 132, n_seg=16).waves == 16     # 20 MB
    assert not kernel.choose_config(shape, 1, 132, n_seg=16).early_next


def test_triton_counters_reset_and_base_fused():
    """Two calls in a row on one prepared delta (the split counters must be back at 0),
    the fused base output, and leading batch dimensions."""
    cm = random_matrix(150, 200, {8: 2, 3: 6, 2: 20}, seed=6)
    kd = kernel.prepare_delta(cm, "cpu")
    x = torch.randn(2, 3, 200).half()
    base = torch.randn(2, 3, 150).half()
    config = small_config(3, 1)
    for _ in range(2):
        y = kernel.delta_matmul(x, kd, base, backend="triton", config=config)
        assert_workspace_clean()
    want = base.double() + x.double() @ decompress_matrix(cm).double().mT
    assert y.shape == (2, 3, 150) and rel(y, want) < 2 * UNIT[torch.float16]


@pytest.mark.slow
def test_triton_z_buffers_across_launches():
    """Launches of different ranks and batch sizes in turn, each against the float64
    product: phase V adds into one of two z buffers while phase U zeroes the other as far
    as the launch before dirtied it, so a small launch between two large ones (or a batch
    of 1 between batches of 7) must leave no stale z behind. A wrong turn or extent fails
    here (the large launch reads what the one before it left)."""
    large = random_matrix(90, 300, {8: 6, 4: 30, 2: 60}, seed=31)
    small = random_matrix(90, 300, {2: 5}, seed=32)
    gen = torch.Generator().manual_seed(33)
    for cm, batch in [(large, 7), (small, 1), (large, 1), (small, 7), (large, 7), (large, 2)]:
        x = torch.randn(batch, 300, generator=gen).half()
        y = kernel.delta_matmul(x, kernel.prepare_delta(cm, "cpu"), backend="triton",
                                config=small_config(2, 1))
        exact = x.double() @ decompress_matrix(cm).double().mT
        assert rel(y, exact) < 2 * UNIT[torch.float16], (batch, rel(y, exact))
        assert_workspace_clean()


def test_triton_batch_over_max_batch():
    """More rows than one launch takes (MAX_BATCH): the batch runs as chunks."""
    cm = random_matrix(70, 90, {4: 6, 2: 12}, seed=12)
    x = torch.randn(kernel.MAX_BATCH + 7, 90, generator=torch.Generator().manual_seed(12))
    y = kernel.delta_matmul(x.half(), kernel.prepare_delta(cm, "cpu"), backend="triton")
    want = x.half().double() @ decompress_matrix(cm).double().mT
    assert y.shape == want.shape and rel(y, want) < 2 * UNIT[torch.float16]


def test_batch_chunks_by_shape(monkeypatch):
    """delta_matmul launches batches in chunks of 32 rows, of 16 from 14336 outputs up, and
    puts the chunks' results back in order."""
    launched = []

    def fake_launch(xc, kd, plan, base, config):
        launched.append(xc.shape[0])
        return xc[:, :1].expand(-1, kd.shape[0]).clone()         # each row's first input
    monkeypatch.setattr(kernel, "launch", fake_launch)
    monkeypatch.setattr(kernel, "KernelDelta", SimpleNamespace)  # a stand-in delta passes
    x = torch.arange(50 * 8, dtype=torch.float16).reshape(50, 8)
    for out_f, want in ((14336, [16, 16, 16, 2]), (11008, [32, 18])):
        launched.clear()
        kd = SimpleNamespace(shape=(out_f, 8), n_tenants=1, S=torch.zeros(1), _tables={})
        y = kernel.delta_matmul(x, kd, backend="triton")
        assert launched == want and torch.equal(y[:, 0], x[:, 0]), out_f


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
    for bad in (kernel.KernelConfig(0, 16), kernel.KernelConfig(1, 24),
                kernel.KernelConfig(1, 16, block_j=48), kernel.KernelConfig(1, 16, u_stages=0),
                kernel.KernelConfig(1, 16, dot_u_warps=3),
                kernel.KernelConfig(1, 16, fma_rows=4)):
        with pytest.raises(ValueError, match="split_v ≥ 1"):
            kernel.delta_matmul(torch.randn(1, 20).half(), cm, backend="triton", config=bad)
    with pytest.raises(ValueError, match="2 tenants"):
        kernel.delta_matmul(torch.randn(1, 20).half(), kernel.prepare_multi_delta([cm, cm], "cpu"),
                            backend="triton")


@pytest.mark.slow
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


# =============================================================================================
# kernel.py, multi-tenant: batched kernels vs the per-tenant reference, the row plan, and a
# model carrying N fine-tunes vs each merged fine-tune run on its own. Tolerances as above:
# each row runs exactly the single-delta kernels' arithmetic for its tenant.

def exact(x, cms, idx, base=None):
    """float64 x[b] Δ̂_{idx[b]}ᵀ (+ base), row by row."""
    rows = [x[b].double() @ decompress_matrix(cms[t]).double().mT for b, t in enumerate(idx)]
    y = torch.stack(rows)
    return y if base is None else y + base.double()


def check_multi(out_f, in_f, tenant_ranks, idx, dtype, splits, with_base, seed):
    cms = [random_matrix(out_f, in_f, r, seed + t) for t, r in enumerate(tenant_ranks)]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(len(idx), in_f, generator=gen).to(dtype)
    base = torch.randn(len(idx), out_f, generator=gen).to(dtype) if with_base else None
    config = None if splits is None else small_config(*splits)
    md = kernel.prepare_multi_delta(cms, "cpu")
    y = kernel.multi_delta_matmul(x, md, torch.tensor(idx), base, backend="triton", config=config)
    assert y.dtype == dtype and y.shape == (len(idx), out_f) and torch.isfinite(y).all()
    assert_workspace_clean()                           # back at 0 for the next call
    want = exact(x, cms, idx, base)
    ref = kernel.multi_delta_matmul(x, cms, torch.tensor(idx), base, backend="reference")
    if want.norm() == 0:                               # every used tenant has rank 0
        assert not y.any()
        return
    assert rel(y, want) < 2 * UNIT[dtype], (rel(y, want), rel(ref, want))
    assert rel(y, ref) < 8 * UNIT[dtype] + rel(ref, want)


RANKS = st.dictionaries(st.sampled_from([1, 2, 3, 4, 8]), st.integers(0, 24), max_size=3)


@st.composite
def batches(draw):
    n = draw(st.integers(1, 4))
    idx = draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=9))
    return [draw(RANKS) for _ in range(n)], idx


@pytest.mark.slow
@settings(max_examples=20, deadline=None)
@given(out_f=st.integers(1, 160), in_f=st.integers(1, 160), tenants=batches(),
       bf16=st.booleans(), with_base=st.booleans(),
       splits=st.one_of(st.none(), st.tuples(st.integers(1, 3), st.integers(1, 3))),
       seed=st.integers(0, 2**16))
@example(out_f=1, in_f=1, tenants=([{2: 1}], [0]), bf16=False, with_base=False, splits=None,
         seed=0)
@example(out_f=129, in_f=127, tenants=([{8: 2, 2: 20}, {3: 17, 1: 9}, {4: 5}],
                                       [2, 0, 2, 2, 0, 1, 0, 2, 2]),   # repeated, unsorted
         bf16=False, with_base=True, splits=(3, 2), seed=1)
@example(out_f=100, in_f=140, tenants=([{2: 24}, {}, {8: 3, 2: 10}, {1: 20}], [3, 1, 3]),
         bf16=True, with_base=False, splits=None, seed=2)   # unused tenants, a rank-0 tenant
@example(out_f=70, in_f=90, tenants=([{2: 12}, {4: 7}], [1] * 9), bf16=False,
         with_base=True, splits=(2, 3), seed=3)             # one tenant, 9 rows: tl.dot path
def test_multi_matches_reference(out_f, in_f, tenants, bf16, with_base, splits, seed):
    """Batched kernels vs float64 and the reference: 1–4 tenants of mixed band layouts
    (every width, ranks 0–24), random per-row tenants (repeated, unused, unsorted), batch
    1–9 (1-row segments: FMA path; longer: tl.dot path), forced splits, fused base."""
    ranks, idx = tenants
    check_multi(out_f, in_f, ranks, idx,
                torch.bfloat16 if bf16 else torch.float16, splits, with_base, seed)


def test_plan_groups_rows_by_tenant():
    plan = kernel.plan_tenants(torch.tensor([2, 0, 2, 2, 3] + [1] * 70), 5, "cpu")
    assert plan.rows_per_tenant == (1, 70, 3, 1, 0) and plan.used == 4 and not plan.is_sorted
    idx = torch.tensor([2, 0, 2, 2, 3] + [1] * 70)
    assert idx[plan.order.long()].tolist() == sorted(idx.tolist())
    segs = {bb: s.tolist() for bb, s, _ in plan.groups}
    # tenant 1's 70 rows: two 32-row segments and one 6-row segment
    assert segs == {1: [[0, 0, 1], [3, 74, 1]], 16: [[1, 65, 6], [2, 71, 3]],
                    32: [[1, 1, 32], [1, 33, 32]]}
    assert kernel.plan_tenants([0, 0, 1], 2, "cpu").is_sorted


def test_multi_more_rows_than_max_batch():
    """A tenant with 66 rows (three segments of ≤ 32, so its delta is read three times) beside
    a 1-row one."""
    check_multi(40, 50, [{2: 9, 8: 1}, {3: 5}], [0] * 33 + [1] + [0] * 33, torch.float16,
                None, True, 11)


def test_multi_non_finite_row_stays_in_its_row():
    """A row whose x holds Inf gives NaN/Inf only in its own output. Tenant 0's rank 5 at
    4 bits is read by phase U, unmasked, in steps of 4 vectors, to vector 8: past its rank
    only the zero padding at the end of its z row (KernelDelta.z_width) keeps tenant 1's
    row, here all NaN, out. It fails with rows of z 7 wide (the largest rank)."""
    cms = [random_matrix(40, 50, {4: 5}, 41), random_matrix(40, 50, {4: 7}, 42)]
    md = kernel.prepare_multi_delta(cms, "cpu")
    x = torch.randn(2, 50, generator=torch.Generator().manual_seed(43)).half()
    x[1, 3] = float("inf")
    y = kernel.multi_delta_matmul(x, md, torch.tensor([0, 1]), backend="triton")
    assert torch.isfinite(y[0]).all() and not torch.isfinite(y[1]).all()
    assert rel(y[:1], exact(x[:1], cms, [0])) < 2 * UNIT[torch.float16]
    assert_workspace_clean()          # z's NaNs are in the buffer the next launch zeroes


def test_multi_leading_dims_and_plan_reuse():
    cms = [random_matrix(30, 40, {2: 8}, 20 + t) for t in range(3)]
    md = kernel.prepare_multi_delta(cms, "cpu")
    x = torch.randn(2, 3, 40).half()
    idx = torch.tensor([[2, 2, 2], [0, 0, 0]])
    plan = kernel.plan_tenants(idx.reshape(-1), 3, "cpu")
    y1 = kernel.multi_delta_matmul(x, md, idx, backend="triton")
    y2 = kernel.multi_delta_matmul(x, md, plan=plan, backend="triton")
    assert y1.shape == (2, 3, 30) and torch.equal(y1, y2)
    assert rel(y1.reshape(6, 30), exact(x.reshape(6, 40), cms, idx.reshape(-1).tolist())) \
        < 2 * UNIT[torch.float16]


def test_multi_errors():
    cms = [random_matrix(10, 20, {2: 3}, 30), random_matrix(10, 20, {2: 3}, 31)]
    x = torch.randn(3, 20).half()
    with pytest.raises(ValueError, match="outside"):
        kernel.multi_delta_matmul(x, cms, torch.tensor([0, 2, 1]), backend="triton")
    with pytest.raises(ValueError, match="one index per row"):
        kernel.multi_delta_matmul(x, cms, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="integers"):
        kernel.multi_delta_matmul(x, cms, torch.tensor([0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="expect"):
        kernel.multi_delta_matmul(torch.randn(3, 21).half(), cms, torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="backend"):
        kernel.multi_delta_matmul(x, cms, torch.tensor([0, 1, 1]), backend="cuda")
    with pytest.raises(ValueError, match="fp16 or bf16"):
        kernel.multi_delta_matmul(x.float(), cms, torch.tensor([0, 1, 1]), backend="triton")
    with pytest.raises(ValueError, match="exactly one"):
        kernel.multi_delta_matmul(x, cms)
    md = kernel.prepare_multi_delta(cms, "cpu")
    with pytest.raises(ValueError, match="reference backend needs"):
        kernel.multi_delta_matmul(x, md, torch.tensor([0, 1, 1]), backend="reference")
    with pytest.raises(ValueError, match="plan is for"):
        kernel.multi_delta_matmul(x, md, plan=kernel.plan_tenants([0, 1], 2, "cpu"),
                                  backend="triton")
    with pytest.raises(ValueError, match="shape"):
        kernel.prepare_multi_delta([cms[0], random_matrix(10, 21, {2: 3}, 32)], "cpu")
    lin = kernel.MultiDeltaLinear(torch.nn.Linear(20, 10), cms, backend="reference")
    with pytest.raises(ValueError, match="use_tenants"):
        lin(x.float())
    with torch.no_grad():
        assert rel(lin(x.float(), [1, 0, 1]) - lin.base(x.float()),
                   exact(x.float(), cms, [1, 0, 1])) < 1e-5


# ----------------------------------------------------------------------------------------------
# A model carrying N fine-tunes vs each merged fine-tune on its own.


def make_tenants(tmp_path, n: int):
    """One tiny Llama base (deltacome.make_example) and n fine-tunes of it that differ only in
    the 7 projections of its block (synthetic long-tailed deltas, seeds 100+k, mean |Δ| ≈ 5 %
    of mean |W| so that tenants differ far beyond fp16 rounding), compressed at
    different budgets (so their band layouts differ) and merged with deltacome.apply.
    Returns base_dir, [delta file], [merged dir]."""
    from safetensors.torch import load_file, save_file

    base_dir, _ = make_example(tmp_path / "pair", layers=1, width=64)
    deltas, merged = [], []
    for k in range(n):
        ft = tmp_path / f"ft{k}"
        shutil.copytree(base_dir, ft)
        gen = torch.Generator().manual_seed(100 + k)
        for shard in sorted(ft.glob("*.safetensors")):
            tensors = load_file(shard)
            for name, w in tensors.items():
                if ".layers." in name and w.ndim == 2:
                    delta = synthetic_delta(*w.shape, gen, scale=0.5)
                    tensors[name] = (w.float() + delta).to(w.dtype)
            save_file(tensors, shard, {"format": "pt"})
        deltas.append(tmp_path / f"delta{k}.safetensors")
        compress(base_dir, ft, deltas[-1], Config(device="cpu", budget=(1 / 16, 1 / 8)[k % 2]),
                 progress=False)
        merged.append(apply(base_dir, deltas[-1], tmp_path / f"merged{k}", "cpu",
                            progress=False))
    return base_dir, deltas, merged


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_multi_tenant_model_matches_merged(tmp_path, backend):
    """One base model patched with 3 tenants' deltas, a batch of 4 sequences for tenants
    [2, 0, 2, 0] (tenant 1 unused; rows unsorted), one forward pass: each sequence's logits
    vs its tenant's merged checkpoint run alone. The merged weights are fp16 (W_base + Δ̂
    rounded once), the patched model adds the delta path to the fp16 base output, so in fp16
    they differ by weight rounding ≈ 2^-11 per weight: ~1e-3 relative in the logits; we
    allow 1e-2 (measured: ~1.2e-3 in fp16, ~5e-4 in fp32, where only the merged side is
    rounded; the base model alone is ~1e-1 away)."""
    transformers = pytest.importorskip("transformers")
    base_dir, deltas, merged = make_tenants(tmp_path, 3)
    dtype = torch.float32 if backend == "reference" else torch.float16
    load = transformers.AutoModelForCausalLM.from_pretrained
    model = load(base_dir, dtype=dtype).eval()
    names = kernel.patch_model_tenants(model, deltas, backend=backend)
    assert len(names) == 7 and all(isinstance(model.get_submodule(n[:-7]), kernel.MultiDeltaLinear)
                                   for n in names)
    tenants = torch.tensor([2, 0, 2, 0])
    ids = torch.randint(0, 512, (4, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with kernel.use_tenants(model, tenants):
            got = model(ids).logits.double()                                  # (4, 6, vocab)
        base_logits = load(base_dir, dtype=dtype).eval()(ids).logits.double()
        for t in (0, 2):
            rows = (tenants == t).nonzero().squeeze(1)
            want = load(merged[t], dtype=dtype).eval()(ids[rows]).logits.double()
            assert rel(got[rows], want) < 1e-2, (t, rel(got[rows], want))
            assert rel(got[rows], want) < 0.1 * rel(base_logits[rows], want)  # Δ matters
    with pytest.raises(ValueError, match="use_tenants"):
        model(ids)                                        # the tenants are cleared on exit


@pytest.mark.slow
def test_patch_model_tenants_errors(tmp_path):
    """Tenants that changed a carried tensor differently cannot share one model."""
    transformers = pytest.importorskip("transformers")
    base_dir, deltas, _ = make_tenants(tmp_path, 1)
    own_ft = tmp_path / "pair" / "ft"                  # make_example's ft: norms, lm_head differ
    compress(base_dir, own_ft, tmp_path / "own.safetensors", Config(device="cpu"),
             progress=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with pytest.raises(DeltaComeError, match="carried tensor .* differs"):
        kernel.patch_model_tenants(model, [deltas[0], tmp_path / "own.safetensors"])
    with pytest.raises(DeltaComeError, match="not in the model|no module"):
        kernel.patch_model_tenants(torch.nn.Module(), deltas)
    with pytest.raises(ValueError, match="no MultiDeltaLinear"):
        with kernel.use_tenants(model, [0]):
            pass


@pytest.mark.slow
def test_bench_tenants_runs_on_cpu(tmp_path):
    """bench.py --tenants on CPU: the reference ways at the small shape, and the memory lines."""
    import json

    import bench

    if torch.cuda.is_available():
        pytest.skip("on CUDA this is the GPU benchmark, not a test")
    assert bench.main(["--tenants", "1,3", "--json", str(tmp_path / "t.json")]) == 0
    result = json.loads((tmp_path / "t.json").read_text())["tenants"]
    assert [(r["tenants"], r["way"]) for r in result["rows"]] == [
        (1, "separate"), (1, "loop"), (3, "separate"), (3, "loop")]
    mem = result["memory"]
    assert 0 < mem["tenant_block_bytes"] <= mem["tenant_block_device_bytes"]
    assert mem["fit_delta_tenants"] > mem["fit_fp16_finetunes"]


def test_bench_gpu_only_modes_refuse_cpu(capsys):
    """--check, --ceiling and --profile need CUDA: on CPU they say so and exit 2."""
    import bench

    if torch.cuda.is_available():
        pytest.skip("on CUDA these run the GPU benchmark")
    for argv in (["--check"], ["--ceiling"], ["--profile", "64x32"]):
        assert bench.main(argv) == 2
        assert "need CUDA" in capsys.readouterr().out


# =============================================================================================
# eval.py: baselines at their byte budgets, the matrix table, the model-level pipeline on a
# tiny random model.

def awkward_delta(out_f, in_f, seed=0):
    return dc.synthetic_delta(out_f, in_f, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", [(96, 160), (129, 127), (48, 300)])
@pytest.mark.parametrize("budget", [1 / 8, 1 / 16, 1 / 32])
@pytest.mark.parametrize("method", ev.METHODS)
def test_methods_fit_their_byte_budget(method, budget, shape):
    delta = awkward_delta(*shape)
    rec = ev.reconstruct(method, delta, budget)
    limit = dc.budget_bytes(*shape, budget)
    if rec is None:
        return                                   # "cannot fit" is an honest answer
    assert rec.delta_hat.shape == delta.shape and torch.isfinite(rec.delta_hat).all()
    slack = 2 if method == "BitDelta" else 0     # BitDelta: 1 bit/weight + its fp16 scale
    assert rec.nbytes <= limit + slack
    if method != "plain low-bit":    # 1-bit min-max (Config.quantizer="minmax") rounds to min or
        assert dc.relative_error(delta, rec.delta_hat) < 1.0 + 1e-6     # max: worse than Δ̂ = 0


def test_baseline_byte_counts_are_exact():
    delta = awkward_delta(100, 200)
    lr = ev.lowrank_fp16(delta, 1 / 16)
    k = int(lr.note.removeprefix("k="))
    assert k == dc.budget_bytes(100, 200, 1 / 16) // (2 * 300 + 4)
    assert lr.nbytes == k * (2 * 300 + 4)
    assert torch.linalg.matrix_rank(lr.delta_hat) == k
    bd = ev.bitdelta(delta, 1 / 16)
    assert bd.nbytes == 100 * 200 // 8 + 2
    assert len(bd.delta_hat.abs().unique()) == 1
    assert ev.bitdelta(delta, 1 / 32) is None
    # plain low-bit: 1 bit plus a 4-byte scale/zero per 128 weights exceeds 1/16 ...
    assert ev.plain_lowbit(delta, 1 / 16) is None
    # ... fits at 1/8, where codes are 200 bits = 7 words and two groups' scale+zero per row
    pl = ev.plain_lowbit(delta, 1 / 8)
    assert pl.note == "1-bit" and pl.nbytes == 100 * (4 * 7 + 4 * 2)


def test_deltacome_methods_match_compress_matrix():
    delta = awkward_delta(64, 192)
    rec = ev.reconstruct("greedy", delta, 1 / 16)
    cm = dc.compress_matrix(delta, dc.Config(budget=1 / 16, device="cpu"))
    assert rec.nbytes == cm.nbytes()
    assert torch.allclose(rec.delta_hat, dc.decompress_matrix(cm))


def test_output_error_matches_direct_computation():
    gen = torch.Generator().manual_seed(1)
    delta, approx = torch.randn(20, 30, generator=gen), torch.randn(20, 30, generator=gen)
    x = torch.randn(50, 30, generator=gen)
    direct = float((x @ (delta - approx).mT).norm() / (x @ delta.mT).norm())
    assert math.isclose(ev.output_error(delta, approx, x.mT @ x), direct, rel_tol=1e-4)
    assert ev.output_error(delta, delta, x.mT @ x) < 1e-3


def test_matrix_table_runs_and_ranks_methods():
    rows = ev.matrix_rows(ev.synthetic_matrices(seed=0, tokens=256, shrink=4))
    table = ev.matrix_table(rows, "synthetic")
    for method in ev.METHODS:
        assert method in table
    fro = {m: sum(r["fro"] for r in rows if r["method"] == m and "fro" in r) for m in ev.METHODS}
    # the method's premise on long-tailed spectra: mixed precision beats one width and low-rank
    assert fro["greedy"] < fro["single 2-bit"] and fro["greedy"] < fro["low-rank fp16"]
    assert all(r["bytes"] <= r["fp16"] / 16 + 2 for r in rows if "bytes" in r)   # BitDelta: +2


def test_kind_of():
    assert ev.kind_of("model.layers.3.self_attn.q_proj.weight") == "q"
    assert ev.kind_of("model.layers.3.mlp.down_proj.weight") == "down"


@pytest.mark.slow
def test_smoke_pipeline_on_tiny_model(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("reasoning_gym")
    cfg = ev.RunConfig(tasks=("chain_sum",), train=ev.TrainConfig(steps=8, batch=8, warmup=2),
                       n_test=8, text_windows=2, gram_windows=2, tiny=True,
                       budgets=(1 / 16, 1 / 32), main_budget=1 / 16,
                       methods=("low-rank fp16", "BitDelta", "plain low-bit", "paper 8/3/2",
                                "greedy"))
    results = ev.run_pipeline(tmp_path / "work", tmp_path / "out", cfg, log=lambda m: None)
    saved = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert saved["results"].keys() == results.keys()
    assert "chain_sum: matrix level" in (tmp_path / "out" / "eval_tables.txt").read_text()
    for method, budget in ev.plan(cfg):
        r = results[f"chain_sum|{method}|{budget:.6g}"]
        if method == "plain low-bit" or (method in ("BitDelta", "low-rank fp16")
                                         and budget < 1 / 16):
            assert not r["fits"]
            continue
        assert r["fits"] and r["bytes"] <= budget * r["fp16"] + 2 * len(r["matrices"])
        assert 0 <= r["acc"] <= 1 and r["ppl_answer"] > 1 and r["ppl_text"] > 1
    ft = results["chain_sum|fine-tune"]
    assert ft["ppl_answer"] < results["chain_sum|base"]["ppl_answer"]   # the fine-tune learned
    # rerunning finds every stage done and changes nothing
    again = ev.run_pipeline(tmp_path / "work", tmp_path / "out", cfg, log=lambda m: None)
    assert json.dumps(again, sort_keys=True) == json.dumps(results, sort_keys=True)  # NaN-safe


def test_compressed_model_equals_deltacome_file_round_trip(tmp_path):
    """The pipeline builds W_base + Δ̂ in memory; deltacome's compress + apply on disk must give
    the same weights (same math), so accuracies measured either way agree."""
    from safetensors.torch import load_file
    base, ft = dc.make_example(tmp_path, layers=1, width=64, sharded=False, dtype=torch.float32)
    dc.compress(base, ft, tmp_path / "d.safetensors", dc.Config(device="cpu"), progress=False)
    dc.apply(base, tmp_path / "d.safetensors", tmp_path / "merged", "cpu", progress=False)
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    b, f = load_file(str(base / "model.safetensors")), load_file(str(ft / "model.safetensors"))
    for name in b:
        if b[name].ndim == 2 and "layers" in name:
            rec = ev.reconstruct("greedy", f[name] - b[name], 1 / 16)
            assert torch.allclose(merged[name], b[name] + rec.delta_hat, atol=1e-6)


# =============================================================================================
# A newcomer's first hour: the CLI's forms (`compress` named or not, -q before the command),
# one-line messages that say what is wrong, progress bars closed before an error, outputs
# with the usual permissions, BASE and FT in different float dtypes, files of format version 1,
# eval.py's help texts.

def cli(*args):
    """deltacome.main in-process with exactly these arguments: (exit code, stdout, stderr)."""
    import contextlib
    import io
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = dc.main([str(a) for a in args])
        except SystemExit as e:                  # argparse's usage errors exit
            code = e.code
    return code, out.getvalue(), err.getvalue()


def same_tensors(a, b):
    ta, tb = load_file(str(a)), load_file(str(b))
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def empty_matrix(delta, cfg, dtype):
    """compress_matrix's stand-in where the files, not their contents, are under test."""
    return CompressedMatrix(tuple(delta.shape), dtype)


@pytest.fixture(scope="module")
def applied(pair, tmp_path_factory):
    """The sharded pair compressed and applied once: (base, ft, delta file, merged dir)."""
    base, ft = pair["sharded"]
    root = tmp_path_factory.mktemp("applied")
    dc.compress(base, ft, root / "d.safetensors", Config(device="cpu"), progress=False)
    dc.apply(base, root / "d.safetensors", root / "merged", "cpu", progress=False)
    return base, ft, root / "d.safetensors", root / "merged"


def test_cli_compress_named_or_not_and_flags_before_the_command(pair, tmp_path):
    base, ft = pair["single"]
    bare, named, quiet = (tmp_path / f"{n}.safetensors" for n in ("bare", "named", "quiet"))
    assert cli(base, ft, bare, "-q")[0] == 0
    assert cli("compress", base, ft, named, "-q")[0] == 0
    assert same_tensors(bare, named)
    code, out, err = cli("-q", "compress", base, ft, quiet)
    assert code == 0 and err == "" and "wrote" in out and same_tensors(bare, quiet)
    code, out, err = cli("-q", "info", named)
    assert code == 0 and err == "" and "matrices" in out
    merged = tmp_path / "merged.safetensors"
    assert cli("--quiet", "apply", base, named, merged)[::2] == (0, "")
    assert cli("-q", "verify", base, named, merged)[0] == 0
    code, out, err = cli("-h", "info")
    assert code == 0 and "deltacome.py info" in out and "DELTA" in out.upper()
    code, _, err = cli("--budget", "1/32", "compress", base, ft, tmp_path / "x.safetensors")
    assert code == 2 and "put --budget after the word compress" in err and err.count("\n") == 1


@pytest.mark.parametrize("args, message", [
    (("--budget", "2", "b", "f", "o"), "budget must be in (0, 1]"),
    (("apply", "b"), "required"),
    (("info",), "required"),
    (("compress", "a", "b", "c", "d"), "unrecognized arguments: d"),
    (("example",), "required"),
])
def test_usage_errors_are_one_line(args, message):
    code, out, err = cli(*args)
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert err.startswith("deltacome: error: ") and message in err and "--help" in err


@pytest.mark.parametrize("command", ["compress", "apply", "verify"])
def test_progress_bar_is_closed_before_the_error(applied, tmp_path, monkeypatch, command):
    base, ft, delta, merged = applied
    monkeypatch.setattr(dc, "compress_matrix", empty_matrix)
    calls, original = [], dc.decompress_matrix

    def failing(cm):                             # each command decompresses every matrix
        calls.append(1)
        if len(calls) == 3:
            raise DeltaComeError("simulated failure")
        return original(cm)
    monkeypatch.setattr(dc, "decompress_matrix", failing)
    args = {"compress": (base, ft, tmp_path / "d.safetensors"),
            "apply": (base, delta, tmp_path / "m"), "verify": (base, delta, merged)}[command]
    code, _, err = cli(command, *args)           # progress bars on
    assert code == 2 and f"{command}:" in err and "%|" in err        # a bar was drawn ...
    assert err.endswith("\ndeltacome: error: simulated failure\n"), repr(err[-200:])  # closed


def test_messages_say_what_is_wrong(pair, tmp_path):
    base, ft = pair["single"]
    out = tmp_path / "d.safetensors"
    assert cli(base, ft, out, "-q")[0] == 0
    pickles = tmp_path / "pickles"
    pickles.mkdir()
    torch.save({"w": torch.ones(2)}, pickles / "pytorch_model.bin")          # zip archive
    torch.save({"w": torch.ones(2)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    meta = {**dc.read_delta_file(out).meta, "version": "1"}         # a string, not 1
    string_version = tmp_path / "string-version.safetensors"
    save_file(load_file(str(out)), str(string_version), {"deltacome": json.dumps(meta)})
    cases = [((base, ft, out, "--widths", "0"), "give at least one width of 1..8 bits"),
             (("info", tmp_path), "is a directory, not a .safetensors file"),
             (("info", string_version), "format version '1' is not supported (this reader "
                                        "knows the integers 1, 2)"),
             ((pickles / "pytorch_model.bin", ft, out), "it looks like a PyTorch pickle"),
             ((tmp_path / "legacy.pt", ft, out), "pickles are not read"),
             ((pickles, ft, out), "it holds pytorch_model.bin: PyTorch pickles are not read")]
    for args, message in cases:
        code, _, err = cli(*args, *(["-q"] if args[0] != "info" else []))
        assert code == 2 and message in err and err.count("\n") == 1, (args, err)
    with pytest.raises(DeltaComeError, match="no width of 1..8 bits"):
        dc.compress_matrix(long_tailed(64, 64), Config(widths=(0,)))


@pytest.mark.parametrize("read_only", [True, False])
def test_unwritable_directory_says_why(applied, tmp_path, monkeypatch, read_only):
    # Root ignores permission bits, and mounting a read-only file system needs privileges:
    # both cases are simulated (`os.access` and `os.statvfs` answer as they would).
    base, ft, delta, _ = applied
    monkeypatch.setattr(dc.os, "access", lambda path, mode: False)
    flag = os.ST_RDONLY if read_only else 0
    monkeypatch.setattr(dc.os, "statvfs", lambda path: SimpleNamespace(f_flag=flag))
    for args in ((base, ft, tmp_path / "d.safetensors"), ("apply", base, delta, tmp_path / "m")):
        code, _, err = cli(*args, "-q")
        assert code == 2 and err.count("\n") == 1
        assert ("Read-only file system" if read_only else "Permission denied") in err, err


@pytest.mark.parametrize("command", ["compress", "apply"])
def test_full_disk_names_the_output_and_leaves_nothing(applied, tmp_path, monkeypatch, command):
    import errno
    base, ft, delta, _ = applied
    monkeypatch.setattr(dc, "compress_matrix", empty_matrix)
    out = tmp_path / ("d.safetensors" if command == "compress" else "merged")
    calls, original = [], dc.SafetensorsWriter.add

    def full(self, name, tensor):                # what a write to a full disk raises: no file name
        calls.append(1)
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(self, name, tensor)
    monkeypatch.setattr(dc.SafetensorsWriter, "add", full)
    args = (base, ft, out) if command == "compress" else ("apply", base, delta, out)
    code, _, err = cli(*args, "-q")
    assert code == 2 and err == f"deltacome: error: {out}: cannot write it: No space left on " \
                                "device\n", err
    assert list(tmp_path.iterdir()) == []


def test_outputs_get_the_usual_permissions(applied, tmp_path, monkeypatch):
    base, ft, delta, _ = applied
    monkeypatch.setattr(dc, "compress_matrix", empty_matrix)
    old = os.umask(0o027)
    try:
        assert cli(base, ft, tmp_path / "d.safetensors", "-q")[0] == 0
        assert cli("apply", base, delta, tmp_path / "merged", "-q")[0] == 0
    finally:
        os.umask(old)
    assert (tmp_path / "d.safetensors").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "merged").stat().st_mode & 0o777 == 0o750
    for shard in (tmp_path / "merged").glob("*.safetensors"):
        assert shard.stat().st_mode & 0o777 == 0o640


def checkpoint_in_dtype(src: Path, dst: Path, dtype: torch.dtype) -> Path:
    """A copy of a sharded checkpoint directory with every float tensor cast to `dtype`."""
    shutil.copytree(src, dst)
    for shard in dst.glob("*.safetensors"):
        save_file({k: v.to(dtype) if v.is_floating_point() else v
                   for k, v in load_file(str(shard)).items()}, str(shard))
    return dst


def test_base_and_fine_tune_in_different_float_dtypes(pair, tmp_path):
    base, ft16 = pair["sharded"]                                  # fp16, sharded, config.json
    ft = checkpoint_in_dtype(ft16, tmp_path / "ft-bf16", torch.bfloat16)
    out, merged = tmp_path / "d.safetensors", tmp_path / "merged"
    assert cli(base, ft, out, "-q", "--method", "4:8")[0] == 0       # a quick band spec
    d = dc.read_delta_file(out)
    base_r, ft_r = dc.CheckpointReader(base), dc.CheckpointReader(ft)
    assert d.meta["dtypes"] == dict.fromkeys(base_r.names(), "bfloat16")
    assert {cm.dtype for cm in d.matrices.values()} == {"bfloat16"}
    # FT's embedding is BASE's cast to bf16: nothing to store, apply casts BASE's
    assert "model.embed_tokens.weight" not in d.carried
    assert cli("apply", base, out, merged, "-q")[0] == 0
    merged_r = dc.CheckpointReader(merged)
    for name in base_r.names():
        w = merged_r.get(name)
        assert w.dtype == torch.bfloat16, name
        if name in d.matrices:        # Δ in fp32, W_base + Δ̂ rounded once to FT's dtype
            expected = base_r.get(name).float() + dc.decompress_matrix(d.matrices[name])
            assert torch.equal(w, expected.to(torch.bfloat16)), name
        else:
            assert torch.equal(w, ft_r.get(name)), name
    assert json.loads((merged / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert cli("verify", base, out, merged, "-q")[0] == 0


def test_config_dtype_set_under_either_key(tmp_path):
    config = tmp_path / "config.json"
    for key in ("torch_dtype", "dtype"):            # transformers 4 / 5 write these
        config.write_text(json.dumps({key: "float16", "hidden_size": 8}))
        dc.set_config_dtype(config, torch.bfloat16)
        assert json.loads(config.read_text()) == {key: "bfloat16", "hidden_size": 8}
    config.write_text("not json")
    dc.set_config_dtype(config, torch.bfloat16)
    assert config.read_text() == "not json"


def test_format_version_1_files_apply_as_before(applied, tmp_path):
    """A file written before format version 2 has no `dtypes` and BASE's dtypes throughout;
    rewritten as such, today's file must apply to the same checkpoint."""
    from safetensors import safe_open
    base, _, new, _ = applied
    old = tmp_path / "v1.safetensors"
    with safe_open(str(new), "pt") as f:
        meta = json.loads(f.metadata()["deltacome"])
    assert meta["version"] == 2 and meta["dtypes"] == {}
    del meta["dtypes"]
    save_file(load_file(str(new)), str(old), {"deltacome": json.dumps({**meta, "version": 1})})
    for delta in (new, old):
        assert cli("apply", base, delta, tmp_path / delta.stem, "-q")[0] == 0
        assert cli("verify", base, delta, tmp_path / delta.stem, "-q")[0] == 0
    for shard in (tmp_path / "v1").glob("*.safetensors"):
        assert same_tensors(shard, tmp_path / "d" / shard.name)
    assert (tmp_path / "v1" / "config.json").read_text() == (base / "config.json").read_text()


@pytest.mark.slow
def test_mixed_dtype_fine_tune_loads_in_its_dtype(pair, tmp_path):
    """compress → apply → from_pretrained: an fp16 base and a bf16 fine-tune give a model that
    transformers loads as bf16 (dtype "auto" reads the merged config) with FT's weights."""
    transformers = pytest.importorskip("transformers")
    base, ft16 = pair["sharded"]
    ft = checkpoint_in_dtype(ft16, tmp_path / "ft-bf16", torch.bfloat16)
    assert cli(base, ft, tmp_path / "d.safetensors", "-q")[0] == 0
    assert cli("apply", base, tmp_path / "d.safetensors", tmp_path / "merged", "-q")[0] == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype="auto")
    assert model.dtype == torch.bfloat16
    norm = model.state_dict()["model.norm.weight"]
    assert torch.equal(norm, dc.CheckpointReader(ft).get("model.norm.weight"))


def eval_parsers(monkeypatch) -> dict:
    """{command: its argparse parser} of eval.py, caught as main parses."""
    import argparse
    caught = {}

    def catch(self, args=None, namespace=None):
        caught["top"] = self
        raise SystemExit(0)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
    with pytest.raises(SystemExit):
        ev.main(["smoke", "x"])
    sub = next(a for a in caught["top"]._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_eval_commands_and_options_are_described(monkeypatch):
    for name, parser in eval_parsers(monkeypatch).items():
        assert parser.description, f"eval.py {name} has no description"
        for action in parser._actions:
            assert action.help, f"eval.py {name} {action.option_strings or action.dest}: no help"


def test_eval_workers_default_overlaps_compression_on_two_cores(monkeypatch):
    monkeypatch.setattr(ev.os, "cpu_count", lambda: 2)
    assert ev.default_workers() == 1
    monkeypatch.setattr(ev.os, "cpu_count", lambda: 64)
    assert ev.default_workers() == 14


def test_eval_kept_is_a_dash_when_undefined():
    assert ev.kept_text(float("nan"), 8) == "       —"
    assert ev.kept_text(0.995, 7) == "  99.5%"


def test_eval_matrices_shows_progress(capsys):
    mats = {"q": (long_tailed(64, 64), None), "k": (long_tailed(32, 64), None)}
    ev.matrix_rows(mats, methods=("BitDelta",), progress=True)
    err = capsys.readouterr().err
    assert "matrices" in err and "2/2" in err


@pytest.mark.slow
def test_smoke_estimate_is_measured(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("reasoning_gym")
    cfg = ev.RunConfig(tasks=("chain_sum",), train=ev.TrainConfig(steps=10, batch=4),
                       n_test=8, text_windows=2, tiny=True, methods=("greedy",),
                       budgets=(1 / 16,))
    seconds, how = ev.smoke_estimate(tmp_path, cfg)
    assert 0 < seconds < 600 and how.endswith("timed on 3 steps and 8 problems")
    assert "chain_sum " in how and "s a step" in how
    assert (tmp_path / "base" / "config.json").exists()          # the pipeline's base, reused
