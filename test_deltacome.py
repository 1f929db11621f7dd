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
import re  # noqa: E402
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
    assert sorted(n for n in d.matrices if d.role(n) == "projection") == sorted(compressed)
    for name, cm in d.matrices.items():
        assert cm.nbytes() <= dc.budget_bytes(*cm.shape, 1 / 16)
    # Carried tensors are FT's, bit-exact; unchanged ones are not stored. The vocabulary:
    # lm_head (every row changed) compressed, the embedding's few changed rows stored whole.
    assert d.role("lm_head.weight") == "vocab" and list(d.rows) == ["model.embed_tokens.weight"]
    for name in base_r.names():
        if name not in d.matrices and name not in d.rows and \
                not torch.equal(base_r.get(name), ft_r.get(name)):
            assert torch.equal(d.carried[name], ft_r.get(name))

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
        assert run_cli(base, ft, out, *extra, "--overwrite") == (0, ""), extra
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

    def failing(delta, cfg, dtype, H=None):
        calls.append(1)
        if len(calls) == 3:
            raise dc.DeltaComeError("simulated failure")
        return original(delta, cfg, dtype, H)
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
# kernel.py: reference vs dense, the tuned and the simple Triton kernels (interpreted on CPU)
# vs the float64 product and the reference, patched vs merged.

# Tolerances, as ‖y − y_ref‖ / ‖y_ref‖ (norm-wise: an elementwise relative error means
# nothing where outputs cancel to ~0):
# * Triton vs the exact product x·Δ̂ᵀ in float64: the tuned kernels accumulate in fp32 with
#   exact products (codes, x and powers of two are exact in fp32/tf32) and round once, at the
#   output, to x.dtype: relative error ≈ unit roundoff u (fp16 2^-11 ≈ 4.9e-4, bf16 2^-8 ≈
#   3.9e-3) averaged over elements; we allow 2u. The simple kernel rounds each code·scale +
#   zero and each product to fp32 (2^-24), sums in fp32 and rounds once at the output: 2u.
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
    for backend in ("triton", "simple"):
        assert torch.equal(kernel.delta_matmul(x.half(), cm, backend=backend),
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


@st.composite
def kernel_configs(draw):
    """Any valid KernelConfig: the tuned kernels must compute the same product whatever
    tiling, pipelining, path (FMA or tl.dot) and dot precision choose_config's rules pick."""
    return kernel.KernelConfig(
        split_v=draw(st.integers(1, 4)), rows_u=16 * draw(st.integers(1, 4)),
        block_j=draw(st.sampled_from([16, 32, 64, 128])),
        block_o=draw(st.sampled_from([32, 64, 128, 256, 512, 1024])),
        v_stages=draw(st.integers(1, 3)), u_stages=draw(st.integers(1, 4)),
        u_regs=draw(st.sampled_from([0, 128])), dot_u_warps=draw(st.sampled_from([1, 2, 4, 8])),
        u_fp16=draw(st.booleans()), early_next=draw(st.booleans()),
        fma_rows=draw(st.integers(1, kernel.FMA_ROWS)))


def dot_units(batch, config):
    """The tuned kernels' error bound vs the exact product in units of the output dtype: 2,
    or 3 where phase U runs an fp16 dot (z·scale rounded to fp16 adds one)."""
    fp16_dot = config is not None and config.u_fp16 and config.rows(batch) > kernel.FMA_ROWS
    return 3 if fp16_dot else 2


def check_kernels(out_f, in_f, ranks, batch, dtype, config, seed, group_size=128):
    """The tuned kernels (under `config`; None: choose_config's) and the simple kernel vs the
    float64 product and the reference."""
    cm = random_matrix(out_f, in_f, ranks, seed, group_size)
    x = torch.randn(batch, in_f, generator=torch.Generator().manual_seed(seed)).to(dtype)
    exact = x.double() @ decompress_matrix(cm).double().mT
    ref = kernel.delta_matmul_reference(x, cm)
    tuned = kernel.delta_matmul(x, kernel.prepare_delta(cm, "cpu"), backend="triton",
                                config=config)
    simple = kernel.delta_matmul(x, cm, backend="simple")
    for name, y, units in (("tuned", tuned, dot_units(batch, config)), ("simple", simple, 2)):
        assert y.dtype == dtype and y.shape == (batch, out_f), name
        if not cm.bands:
            assert not y.any(), name
            continue
        assert torch.isfinite(y).all(), name
        assert rel(y, exact) < units * UNIT[dtype], (name, rel(y, exact), rel(ref, exact))
        # The fp16/bf16 reference can itself be off (one output with cancellation: 6.7e-3).
        assert rel(y, ref) < 8 * UNIT[dtype] + rel(ref, exact), name


WIDTH_RANKS = st.dictionaries(st.sampled_from([1, 2, 3, 4, 8]), st.integers(0, 40),
                              min_size=1, max_size=3)


@pytest.mark.parametrize("out_f, in_f, ranks, batch, bf16, config, seed", [
    (1, 42, {4: 25}, 1, False, None, 0),
    (129, 127, {8: 3, 3: 17, 2: 33}, 1, False, small_config(3, 2), 1),
    (127, 129, {1: 40, 4: 0}, 5, True, small_config(2, 3), 2),
    (65, 100, {8: 2, 1: 9}, 2, True, small_config(2, 2), 6)])
def test_kernels_match_reference_on_awkward_shapes(out_f, in_f, ranks, batch, bf16, config,
                                                   seed):
    """The fast suite's share of test_kernels_match_reference: awkward shapes, every width,
    rank 0, batch 1, 2 and 5, fp16 and bf16, against the float64 product and the reference."""
    check_kernels(out_f, in_f, ranks, batch, torch.bfloat16 if bf16 else torch.float16,
                  config, seed)


@pytest.mark.slow
@settings(max_examples=25, deadline=None)
@given(out_f=st.integers(1, 300), in_f=st.integers(1, 300), ranks=WIDTH_RANKS,
       batch=st.integers(1, 5), bf16=st.booleans(),
       config=st.one_of(st.none(), kernel_configs()), seed=st.integers(0, 2**16))
@example(out_f=1, in_f=1, ranks={2: 1}, batch=1, bf16=False, config=None, seed=0)
@example(out_f=1, in_f=42, ranks={4: 25}, batch=1, bf16=False, config=None, seed=0)
@example(out_f=129, in_f=127, ranks={8: 3, 3: 17, 2: 33}, batch=1, bf16=False,
         config=small_config(3, 2), seed=1)
@example(out_f=127, in_f=129, ranks={1: 40, 4: 0}, batch=5, bf16=True,
         config=small_config(2, 3), seed=2)
@example(out_f=300, in_f=257, ranks={8: 2, 2: 40}, batch=2, bf16=False,
         config=small_config(4, 4), seed=3)
@example(out_f=200, in_f=150, ranks={8: 40, 2: 30}, batch=1, bf16=False,
         config=small_config(2, 2), seed=4)
@example(out_f=200, in_f=150, ranks={8: 40, 2: 30}, batch=3, bf16=True,
         config=small_config(1, 3), seed=5)
@example(out_f=129, in_f=257, ranks={8: 3, 3: 17, 1: 33}, batch=2, bf16=True,
         config=small_config(3, 2), seed=6)
@example(out_f=200, in_f=150, ranks={8: 5, 3: 20, 2: 40}, batch=5, bf16=False,
         config=kernel.KernelConfig(2, 32, u_fp16=True), seed=24)
@example(out_f=200, in_f=150, ranks={8: 5, 3: 20, 2: 40}, batch=5, bf16=False,
         config=kernel.KernelConfig(2, 32, u_fp16=False), seed=24)
def test_kernels_match_reference(out_f, in_f, ranks, batch, bf16, config, seed):
    """The tuned kernels under any valid KernelConfig, and the simple kernel, interpreted, vs
    the float64 product and the reference, over awkward shapes (1, 127, 129, 257: not
    multiples of 16, 32, 128 or the tile widths), every width, ranks including 0 and 1,
    batch 1–5 (the FMA path up to the config's fma_rows, the tl.dot path above, with phase
    U's dot in fp16 or tf32), and items that split the reductions (the partial-sum and
    counter path; an 8-bit band of rank 40 beside a 2-bit band)."""
    check_kernels(out_f, in_f, ranks, batch, torch.bfloat16 if bf16 else torch.float16,
                  config, seed)


@pytest.mark.parametrize("group_size", [slow(32), 96])
def test_kernels_other_group_sizes(group_size):
    """Group sizes that do not divide a 16-row block (96) or are smaller than it (32)."""
    check_kernels(100, 300, {8: 2, 2: 20, 1: 10}, 1, torch.float16, small_config(3, 2), 4,
                  group_size)
    check_kernels(100, 300, {4: 5, 2: 20}, 3, torch.float16, small_config(2, 2), 5, group_size)


@pytest.mark.parametrize("dtype, x_scale, s_scale", [
    slow(torch.float16, 2.0**-12, 1.0), slow(torch.float16, 2.0**6, 1.0),
    slow(torch.float16, 1.0, 2.0**-12), slow(torch.float16, 1.0, 2.0**6),
    slow(torch.bfloat16, 2.0**-50, 1.0), slow(torch.bfloat16, 2.0**38, 1.0),
    slow(torch.bfloat16, 1.0, 2.0**-30), slow(torch.bfloat16, 1.0, 2.0**30)])
def test_triton_exact_across_magnitudes(dtype, x_scale, s_scale):
    """Batch 1 and 2 take codes as fp32 denormals times x or z·scale lifted by powers of two
    (_code_denormals), batch 3 an fp16 dot of z·scale lifted per row (_row_lift): still
    within rounding of the exact product for inputs far from 1, inside the documented range
    of batch 1–2 (2^-62 ≤ |x| < 2^43, 2^-41 ≤ |z·scale| < 2^64), each row of a batch
    against its own exact product; the simple kernel (plain fp32) on all three rows."""
    cm = random_matrix(130, 200, {8: 3, 4: 5, 2: 20, 1: 8}, seed=21)
    for band in cm.bands:
        band.S.mul_(s_scale)
    kd = kernel.prepare_delta(cm, "cpu")
    x = (torch.randn(3, 200, generator=torch.Generator().manual_seed(21)) * x_scale).to(dtype)
    x[1] *= 2                                   # batch 2 on the FMA path: rows of their own
    config = small_config(2, 2)
    runs = [(x[:1], kd, "triton"), (x[:2], kd, "triton"), (x, kd, "triton"), (x, cm, "simple")]
    for rows, delta, backend in runs:
        y = kernel.delta_matmul(rows, delta, backend=backend,
                                config=config if backend == "triton" else None)
        exact = rows.double() @ decompress_matrix(cm).double().mT
        bound = dot_units(rows.shape[0], config if backend == "triton" else None) * UNIT[dtype]
        for i in range(rows.shape[0]):
            assert torch.isfinite(y[i]).all() and rel(y[i], exact[i]) < bound, (backend, i)


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


def work_items(table, n):
    """The first n rows of a work table as WorkItems."""
    return [kernel.WorkItem._make(row[:len(kernel.WorkItem._fields)])
            for row in table[:n].tolist()]


def test_u_items_cover_each_band_once():
    """Phase-U items: every output tile covers each band's vectors exactly once, in chunks of
    at most `rows` vectors that start at a multiple of 16 and end at one or at the band's end
    (phase U reads 16 vectors a step, past a chunk's end only into the band's zero padding),
    and each item knows how many items its tile has (the last one writes the sum)."""
    kd = kernel.prepare_delta(random_matrix(100, 64, {8: 40, 3: 50, 2: 70}, 7), "cpu")
    rank = {8: 40, 4: 50, 2: 70}                    # by container width (3 bits in 4)
    for rows in (16, 32, 48, 64):
        table, n, tiles = kd.u_items(64, rows)
        items = work_items(table, n)
        spans = {}
        for it in items:
            assert it.rank == rank[it.c] and it.first == it.tile < tiles
            assert 0 < it.hi - it.lo <= rows and it.lo % 16 == 0
            assert it.hi % 16 == 0 or it.hi == it.rank
            assert it.tile_items == sum(other.tile == it.tile for other in items)
            spans.setdefault((it.tile, it.c), []).append((it.lo, it.hi))
        assert len(spans) == 3 * tiles
        for (_, c), s in spans.items():
            s = sorted(s)
            assert s[0][0] == 0 and s[-1][1] == rank[c]
            assert all(a[1] == b[0] for a, b in zip(s, s[1:]))


def test_v_items_cover_each_tile_once():
    """Phase-V items: every tile of block_j vectors covers the groups exactly once, in
    chunks of at most ⌈groups / split⌉ groups, and each item knows its tile's item count."""
    kd = kernel.prepare_delta(random_matrix(64, 1000, {8: 40, 3: 50, 2: 70}, 8), "cpu")
    n_groups = -(-1000 // 128)                                   # 8
    for split in (1, 2, 3, 8):
        table, n, _ = kd.v_items(16, split)
        spans = {}
        for it in work_items(table, n):
            assert 0 < it.hi - it.lo <= -(-n_groups // split) and it.first < it.rank
            spans.setdefault((it.c, it.first, it.tile, it.tile_items), []).append(
                (it.lo, it.hi))
        assert sum(-(-r // 16) for r in (40, 50, 70)) == len({t for _, _, t, _ in spans})
        for (_, _, _, count), s in spans.items():
            s = sorted(s)
            assert len(s) == count and s[0][0] == 0 and s[-1][1] == n_groups
            assert all(a[1] == b[0] for a, b in zip(s, s[1:]))


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
    simple = kernel.delta_matmul(x, cm, base, backend="simple")
    assert simple.shape == (2, 3, 150) and rel(simple, want) < 2 * UNIT[torch.float16]


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


@pytest.mark.parametrize("rows, chunk", [(kernel.MAX_BATCH + 7, None), (12, 5)])
def test_triton_batch_in_chunks(monkeypatch, rows, chunk):
    """More rows than one launch takes (MAX_BATCH, or a chunk size rows_per_launch picks):
    delta_matmul launches the batch in chunks, each with its rows' base output, and puts
    the results back in order."""
    if chunk is not None:
        monkeypatch.setattr(kernel, "rows_per_launch", lambda shape: chunk)
    cm = random_matrix(70, 90, {4: 6, 2: 12}, seed=12)
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(rows, 90, generator=gen).half()
    base = torch.randn(rows, 70, generator=gen).half()
    y = kernel.delta_matmul(x, kernel.prepare_delta(cm, "cpu"), base, backend="triton")
    want = base.double() + x.double() @ decompress_matrix(cm).double().mT
    assert y.shape == want.shape and rel(y, want) < 2 * UNIT[torch.float16]


def test_prefill_batch_is_one_launch(monkeypatch):
    """A batch past 2 × MAX_BATCH rows (a prompt's prefill) runs as one launch over the plan's
    segments, not one launch per chunk, and gives the same product."""
    launches = []
    real = kernel.launch
    monkeypatch.setattr(kernel, "launch", lambda x, *a: launches.append(len(x)) or real(x, *a))
    cm = random_matrix(70, 90, {4: 6, 2: 12}, seed=13)
    rows = 2 * kernel.MAX_BATCH + 9
    x = torch.randn(rows, 90, generator=torch.Generator().manual_seed(13)).half()
    y = kernel.delta_matmul(x, kernel.prepare_delta(cm, "cpu"), backend="triton")
    want = x.double() @ decompress_matrix(cm).double().mT
    assert launches == [rows] and rel(y, want) < 2 * UNIT[torch.float16]


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
    groups = {id(patched.get_submodule(n[:-7]).group) for n in names} - {id(None)}
    assert len(groups) == 2                 # fused by default: q/k/v and gate/up
    ids = torch.randint(0, 512, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = merged(ids).logits.double()
        got = patched(ids).logits.double()
        unpatched = load(base_dir, dtype=dtype).eval()(ids).logits.double()
    assert rel(got, want) < 1e-2
    assert rel(got, want) < 0.1 * rel(unpatched, want)       # the delta path does matter


def test_patch_model_without_projections(tmp_path):
    """A delta file that compresses no projection (only vocabulary and carried tensors)
    patches a model as one with projections does, under the default fuse, which then has
    nothing to fuse; one of tenants too."""
    transformers = pytest.importorskip("transformers")
    base_dir, ft_dir = make_example(tmp_path / "pair", layers=1, width=64)
    delta = tmp_path / "d.safetensors"
    compress(base_dir, ft_dir, delta, Config(device="cpu", include="^$"), progress=False)
    assert not [n for n in dc.read_delta_file(delta).matrices if ".layers." in n]
    load = transformers.AutoModelForCausalLM.from_pretrained
    model, ft = load(base_dir), load(ft_dir)
    assert kernel.patch_model(model, delta, backend="reference") == []
    norm = "model.layers.0.input_layernorm.weight"
    assert torch.equal(model.state_dict()[norm], ft.state_dict()[norm])
    tenants = load(base_dir)
    replaced = kernel.patch_model_tenants(tenants, [delta, delta], backend="reference")
    assert sorted(replaced) == ["lm_head.weight", "model.embed_tokens.weight"]  # vocab only


def test_patch_model_errors(tmp_path):
    base_dir, ft_dir = make_example(tmp_path / "pair", layers=1, width=64)
    compress(base_dir, ft_dir, tmp_path / "delta.safetensors", Config(device="cpu"),
             progress=False)
    model = torch.nn.Module()
    with pytest.raises(Exception, match="not in the model|no module"):
        kernel.patch_model(model, tmp_path / "delta.safetensors")
    assert read_delta_file(tmp_path / "delta.safetensors").matrices


PHASE_U_PTX = """
import collections, json, re, sys
import kernel, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
fn = kernel._u_kernel
consts = dict(HAS_BASE=True, GROUP=128, BLOCK_B=1, BLOCK_O=512, STAGES=3, WIDTHS=4, PDL=False,
              EARLY_NEXT=False, U_FP16=False, FUSED=True, ALIGNED=sys.argv[1] == "1")
floats, halves = ("z_ptr", "acc_ptr"), ("y_ptr", "base_ptr")
sig = {a: "constexpr" if a in consts else "*fp32" if a in floats else "*fp16" if a in halves
       else "*i32" if a.endswith("_ptr") else "i32" for a in fn.arg_names}
attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if a not in consts}
ptx = triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs),
                     target=GPUTarget("cuda", 90, 32), options=dict(num_warps=1)).asm["ptx"]
print(json.dumps(collections.Counter(re.findall(r"(?:st|ld|red)\\.global[.\\w]*", ptx))))
"""


@pytest.mark.slow
def test_phase_u_output_tile_takes_vectors():
    """Phase U's output tile (the partial sums' atomics, the base output, y) takes 16-byte
    vectors where every member's columns are aligned (KernelDelta.aligned_outputs), and one
    element an access without the hint: the sm_90 PTX, compiled offline, of both. A lost
    hint slows every fused launch (docs/PERFORMANCE.md) and no numeric test sees it."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    counts = {}
    for aligned in ("1", "0"):
        out = subprocess.run([sys.executable, "-c", PHASE_U_PTX, aligned], env=env,
                             cwd=Path(__file__).parent, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]
        counts[aligned] = json.loads(out.stdout.strip().splitlines()[-1])
    scalar = ("st.global.b16", "ld.global.b16", "red.global.gpu.relaxed.add.f32")
    assert not any(counts["1"].get(op) for op in scalar), counts["1"]
    assert counts["1"].get("red.global.gpu.relaxed.add.v4.f32")
    assert all(counts["0"].get(op) for op in scalar), counts["0"]
    a, b, c = (random_matrix(n, 48, {2: 3}, seed=n) for n in (64, 32, 60))
    assert kernel.prepare_fused_delta([[a, b]], "cpu").aligned_outputs
    assert not kernel.prepare_fused_delta([[a, c]], "cpu").aligned_outputs
    assert not kernel.prepare_fused_delta([[c, a]], "cpu").aligned_outputs


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
    """Tenants that changed tensors outside the projections differently share one model
    (per-tenant norms, embedding, lm_head); a model without the files' tensors is an error."""
    transformers = pytest.importorskip("transformers")
    base_dir, deltas, _ = make_tenants(tmp_path, 1)
    own_ft = tmp_path / "pair" / "ft"                  # make_example's ft: norms, lm_head differ
    compress(base_dir, own_ft, tmp_path / "own.safetensors", Config(device="cpu"),
             progress=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    kernel.patch_model_tenants(model, [deltas[0], tmp_path / "own.safetensors"])
    assert isinstance(model.model.layers[0].input_layernorm, kernel.MultiNorm)
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with pytest.raises(DeltaComeError, match="not in the model|no module"):
        kernel.patch_model_tenants(torch.nn.Module(), deltas)
    with pytest.raises(ValueError, match="no tenant layers"):
        with kernel.use_tenants(model, [0]):
            pass


@pytest.mark.slow
def test_bench_tenants_runs_on_cpu(tmp_path):
    """bench.py --tenants on CPU: the reference ways at the small shape (block, vocabulary
    ends, the model composed of them), and the memory lines."""
    import json

    import bench

    if torch.cuda.is_available():
        pytest.skip("on CUDA this is the GPU benchmark, not a test")
    assert bench.main(["--tenants", "1,3", "--json", str(tmp_path / "t.json")]) == 0
    result = json.loads((tmp_path / "t.json").read_text())["tenants"]
    assert [(r["tenants"], r["part"], r["way"]) for r in result["rows"]] == [
        (n, part, way) for n in (1, 3) for part in ("block", "vocab", "model")
        for way in ("separate", "loop")]
    for r in result["rows"]:                  # the model: 2 layers × block + vocabulary ends
        if r["part"] == "model":
            block, vocab = (next(q for q in result["rows"] if q["part"] == part and
                                 q["tenants"] == r["tenants"] and q["way"] == r["way"])
                            for part in ("block", "vocab"))
            assert math.isclose(r["us"], 2 * block["us"] + vocab["us"])
            assert r["bytes_read"] == 2 * block["bytes_read"] + vocab["bytes_read"]
    mem = result["memory"]
    assert 0 < mem["tenant_block_bytes"] <= mem["tenant_block_device_bytes"]
    assert 0 < mem["tenant_vocab_bytes"] <= mem["tenant_vocab_device_bytes"]
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


def smallest_bytes(method: str, out_f: int, in_f: int) -> int:
    """The fewest bytes `method` stores anything in, from its definition in eval.py: one
    fp16 singular triplet (low-rank), the sign matrix (BitDelta; its 2-byte scale is let
    in), Δ's rows at 1 bit (plain low-bit), one singular vector pair at the method's
    narrowest width (Delta-CoMe)."""
    if method == "low-rank fp16":
        return 2 * (out_f + in_f) + 4
    if method == "BitDelta":
        return -(-out_f * in_f // 8)
    if method == "plain low-bit":
        return ev.plain_bytes(out_f, in_f, 1)
    spec = ev.DELTACOME[method]["method"]
    bits = min(dc.Config().widths) if spec == "greedy" else min(
        b for b, _ in dc.parse_bands(dc.PAPER_BANDS if spec == "paper" else spec))
    return dc.vector_bytes(out_f, in_f, bits)


@pytest.mark.parametrize("shape", [(96, 160), (129, 127), (48, 300)])
@pytest.mark.parametrize("budget", [1 / 8, 1 / 16, 1 / 32])
@pytest.mark.parametrize("method", ev.METHODS)
def test_methods_fit_their_byte_budget(method, budget, shape):
    """A method fits exactly when its smallest unit fits (at 1/16 and up low-rank and every
    Delta-CoMe variant must; BitDelta at 1/8, being 1/16 and a byte over on odd shapes),
    and then its bytes stay within the budget."""
    delta = awkward_delta(*shape)
    rec = ev.reconstruct(method, delta, budget)
    limit = dc.budget_bytes(*shape, budget)
    assert (rec is not None) == (smallest_bytes(method, *shape) <= limit), (method, limit)
    if budget >= (1 / 8 if method == "BitDelta" else 1 / 16) and method != "plain low-bit":
        assert rec is not None
    if rec is None:
        return                                   # "cannot fit" is an honest answer here
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
                                "greedy", "greedy calib"), calib_tokens=1024)
    results = ev.run_pipeline(tmp_path / "work", tmp_path / "out", cfg, log=lambda m: None)
    saved = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert saved["results"].keys() == results.keys()
    tables = (tmp_path / "out" / "eval_tables.txt").read_text()
    assert "chain_sum: matrix level" in tables and "greedy calib − greedy at 1/32" in tables
    assert len(results["chain_sum|greedy calib|0.03125"]["scores"]) == cfg.n_test
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
# Safety: delta files validated on read (metadata, every tensor's shape and dtype, finiteness,
# checksums), outputs kept apart from inputs and from anything deltacome did not write,
# integer matrices carried exactly, non-finite values refused, options checked as they are
# parsed, patch_model all or nothing.

UP, QP = "model.layers.0.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.weight"
FAST = Config(device="cpu", quantizer="minmax")     # these tests need a file, not its quality


def write_checkpoint(path: Path, tensors: dict, sharded: bool) -> Path:
    """tensors as one .safetensors file at `path`, or as a HF directory of two shards (the
    matrices, the rest) with an index and a config.json."""
    if not sharded:
        save_file(tensors, str(path))
        return path
    path.mkdir()
    shards = {"model-00001-of-00002.safetensors": {k: v for k, v in tensors.items() if v.ndim == 2},
              "model-00002-of-00002.safetensors": {k: v for k, v in tensors.items() if v.ndim != 2}}
    for shard, part in shards.items():
        save_file(part, str(path / shard), {"format": "pt"})
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: shard for shard, part in shards.items() for k in part}}))
    (path / "config.json").write_text("{}")
    return path


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A small fp16 pair (an up_proj 40×160, wider than one 128-group, a q_proj 40×40, a norm
    that the fine-tune changed, an embedding it did not) as single files and as sharded
    directories, each compressed (with checksums) and merged back."""
    root = tmp_path_factory.mktemp("safety")
    gen = torch.Generator().manual_seed(0)
    base, ft = {}, {}
    for name, (o, i) in ((UP, (40, 160)), (QP, (40, 40))):
        base[name] = (torch.randn(o, i, generator=gen) / math.sqrt(i)).half()
        ft[name] = (base[name].float() + synthetic_delta(o, i, gen, scale=0.5)).half()
    base["model.norm.weight"] = torch.ones(40).half()
    ft["model.norm.weight"] = (1 + 0.01 * torch.randn(40, generator=gen)).half()
    base["model.embed_tokens.weight"] = ft["model.embed_tokens.weight"] = \
        torch.randn(10, 40, generator=gen).half()
    ns = SimpleNamespace(root=root, tensors=(base, ft))
    for kind, sharded in (("file", False), ("dir", True)):
        b = write_checkpoint(root / f"base-{kind}", base, sharded)
        f = write_checkpoint(root / f"ft-{kind}", ft, sharded)
        delta = root / f"delta-{kind}.safetensors"
        compress(b, f, delta, FAST, progress=False)
        merged = apply(b, delta, root / f"merged-{kind}", "cpu", progress=False)
        setattr(ns, kind, SimpleNamespace(base=b, ft=f, delta=delta, merged=merged))
    return ns


def tree(path: Path) -> dict:
    """Everything under `path` (a file or a directory): relative name -> bytes (None for a
    directory), to check that a command changed nothing."""
    path = Path(path)
    if path.is_file():
        return {".": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else None
            for p in sorted(path.rglob("*"))}


def rewrite_delta(src: Path, dst: Path, corrupt=None) -> Path:
    """Copy a delta file as files were written before checksums (so only the structural checks
    stand between a corruption and its use), with corrupt(meta, tensors) -> metadata text
    applied: it may edit the parsed metadata and the tensors in place."""
    from safetensors import safe_open
    with safe_open(str(src), "pt") as f:
        meta = json.loads(f.metadata()[dc.FORMAT_NAME])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    del meta["checksums"]
    text = corrupt(meta, tensors) if corrupt else json.dumps(meta)
    save_file(tensors, str(dst), {dc.FORMAT_NAME: text})
    return dst


def meta_edit(fn):
    """A corruption of the metadata alone: fn(meta) edits it in place."""
    def corrupt(meta, tensors):
        fn(meta)
        return json.dumps(meta)
    return corrupt


def tensor_edit(fn):
    """A corruption of the tensors alone: fn(tensors) edits the dict in place."""
    def corrupt(meta, tensors):
        fn(tensors)
        return json.dumps(meta)
    return corrupt


def set_entry(key, value, matrix=UP):
    return meta_edit(lambda m: m["matrices"][matrix].__setitem__(key, value))


def set_band(index, value):
    return meta_edit(lambda m: m["matrices"][UP]["bands"][0].__setitem__(index, value))


def set_value(name, index, value):
    return tensor_edit(lambda t: t[name].view(-1).__setitem__(index, value))


B0 = f"{UP}.band0"
CORRUPT_DELTAS = {          # case: (corruption, the start of what the error names)
    "metadata not JSON": (lambda m, t: '{"format": "deltacome", ', "corrupt metadata: not JSON"),
    "metadata a list": (lambda m, t: "[1, 2]", "not a JSON object"),
    "metadata a number": (lambda m, t: "3", "not a JSON object"),
    "no format": (meta_edit(lambda m: m.pop("format")), "'format'"),
    "no version": (meta_edit(lambda m: m.pop("version")), "'version'"),
    "version a string": (meta_edit(lambda m: m.update(version="1")), "'version' is '1'"),
    "version 3": (meta_edit(lambda m: m.update(version=3)), "format version 3"),
    "no group_size": (meta_edit(lambda m: m.pop("group_size")), "'group_size'"),
    "group size 0": (meta_edit(lambda m: m.update(group_size=0)), "'group_size' is 0"),
    "group size 64": (meta_edit(lambda m: m.update(group_size=64)), "the metadata implies"),
    "group size 'abc'": (meta_edit(lambda m: m.update(group_size="abc")), "'group_size'"),
    "group size 2^30": (meta_edit(lambda m: m.update(group_size=2**30)), "'group_size'"),
    "group size true": (meta_edit(lambda m: m.update(group_size=True)), "'group_size'"),
    "no matrices": (meta_edit(lambda m: m.pop("matrices")), "'matrices'"),
    "matrices a list": (meta_edit(lambda m: m.update(matrices=[UP])), "'matrices'"),
    "no carried": (meta_edit(lambda m: m.pop("carried")), "'carried'"),
    "carried twice": (meta_edit(lambda m: m["carried"].append(m["carried"][0])), "'carried'"),
    "carried and compressed": (meta_edit(lambda m: m["carried"].append(UP)), "compressed and"),
    "matrix not an object": (meta_edit(lambda m: m["matrices"].update({UP: 5})), "not a JSON"),
    "shape 3-D": (set_entry("shape", [40, 160, 1]), "'shape'"),
    "shape negative": (set_entry("shape", [-40, 160]), "'shape'"),
    "shapes swapped": (set_entry("shape", [160, 40]), "the metadata implies"),
    "dtype int8": (set_entry("dtype", "int8"), "'dtype'"),
    "bands not a list": (set_entry("bands", "4:3"), "'bands'"),
    "band not a pair": (meta_edit(lambda m: m["matrices"][UP]["bands"][0].append(1)), "'bands'"),
    "bits 0": (set_band(0, 0), "'bands'"),
    "bits 9": (set_band(0, 9), "'bands'"),
    "bits changed": (meta_edit(lambda m: m["matrices"][UP]["bands"][0].__setitem__(
        0, 2 if m["matrices"][UP]["bands"][0][0] > 2 else 4)), "the metadata implies"),
    "rank larger": (meta_edit(lambda m: m["matrices"][UP]["bands"][0].__setitem__(
        1, m["matrices"][UP]["bands"][0][1] + 1)), "the metadata implies"),
    "ranks over min(out, in)": (set_band(1, 41), "ranks add up"),
    "rank negative": (set_band(1, -1), "'bands'"),
    "error a string": (set_entry("error", "abc"), "'error'"),
    "band tensor missing": (tensor_edit(lambda t: t.pop(f"{B0}.U.codes")), "tensor"),
    "carried tensor missing": (tensor_edit(lambda t: t.pop("carry.model.norm.weight")), "tensor"),
    "extra tensor": (tensor_edit(lambda t: t.__setitem__("carry.x", torch.ones(2))), "tensor"),
    "codes short": (tensor_edit(lambda t: t.__setitem__(f"{B0}.V.codes",
                                                        t[f"{B0}.V.codes"][:, :-1].clone())),
                    "the metadata implies"),
    "rows short": (tensor_edit(lambda t: t.__setitem__(f"{B0}.U.codes",
                                                       t[f"{B0}.U.codes"][:-1].clone())),
                   "the metadata implies"),
    "scales short": (tensor_edit(lambda t: t.__setitem__(f"{B0}.V.scale",
                                                         t[f"{B0}.V.scale"][:, :-1].clone())),
                     "the metadata implies"),
    "codes float": (tensor_edit(lambda t: t.__setitem__(f"{B0}.U.codes",
                                                        t[f"{B0}.U.codes"].float())),
                    "the metadata implies"),
    "S fp16": (tensor_edit(lambda t: t.__setitem__(f"{B0}.S", t[f"{B0}.S"].half())),
               "the metadata implies"),
    "NaN S": (set_value(f"{B0}.S", 0, float("nan")), "NaN or Inf"),
    "Inf scale": (set_value(f"{B0}.U.scale", 0, float("inf")), "NaN or Inf"),
    "NaN zero": (set_value(f"{B0}.V.zero", 1, float("nan")), "NaN or Inf"),
    "NaN carried": (set_value("carry.model.norm.weight", 3, float("nan")), "NaN or Inf"),
}


def linear_model(base_file: Path) -> torch.nn.Module:
    """An nn.Module whose state_dict has BASE's names, in fp32: an nn.Linear (no bias) for
    each 2-D weight of a block, a parameter for everything else."""
    root = torch.nn.Module()
    for name, w in load_file(str(base_file)).items():
        *path, leaf = name.split(".")
        linear = w.ndim == 2 and ".layers." in name
        module = root
        for part in path[:-1] if linear else path:
            if not hasattr(module, part):
                module.add_module(part, torch.nn.Module())
            module = getattr(module, part)
        if linear:
            layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
            layer.weight.data.copy_(w)
            module.add_module(path[-1], layer)
        else:
            module.register_parameter(leaf, torch.nn.Parameter(w.float(), requires_grad=False))
    return root


def model_state(model: torch.nn.Module):
    """What patching may change: every tensor's bytes and every module's type."""
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            [(n, type(m)) for n, m in model.named_modules()])


def assert_same_state(model, state):
    tensors, modules = model_state(model)
    assert modules == state[1]
    assert tensors.keys() == state[0].keys()
    assert all(dc.same_bits(tensors[k], state[0][k]) for k in tensors)


def test_file_without_checksums_still_loads(small, tmp_path):
    """A file as written before checksums (none in its metadata) reads back the same."""
    old = rewrite_delta(small.file.delta, tmp_path / "old.safetensors")
    a, b = read_delta_file(small.file.delta), read_delta_file(old)
    assert "checksums" in a.meta and "checksums" not in b.meta
    assert a.matrices.keys() == b.matrices.keys() and a.carried.keys() == b.carried.keys()
    for name in a.matrices:
        assert torch.equal(decompress_matrix(a.matrices[name]), decompress_matrix(b.matrices[name]))
    assert all(dc.same_bits(a.carried[k], b.carried[k]) for k in a.carried)
    assert run_cli("verify", small.file.base, old, small.file.merged)[0] == 0


@pytest.mark.parametrize("case", list(CORRUPT_DELTAS))
def test_corrupt_delta_file_is_refused_everywhere(small, tmp_path, case):
    """Each class of corruption, in a file without checksums so that the structural checks
    alone must catch it: read_delta_file, info, apply and verify refuse it in one line (apply
    writing nothing), and patch_model leaves the model as it was."""
    corrupt, message = CORRUPT_DELTAS[case]
    bad = rewrite_delta(small.file.delta, tmp_path / "bad.safetensors", corrupt)
    with pytest.raises(DeltaComeError, match=re.escape(message)):
        read_delta_file(bad)
    out = tmp_path / "merged.safetensors"
    for args in (("info", bad), ("apply", small.file.base, bad, out),
                 ("verify", small.file.base, bad, small.file.merged)):
        code, err = run_cli(*args)
        assert code == 2 and err.startswith("deltacome: error:") and err.count("\n") == 1, \
            (args, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors"]
    model = linear_model(small.file.base)
    state = model_state(model)
    with pytest.raises(DeltaComeError):
        kernel.patch_model(model, bad)
    assert_same_state(model, state)


def flip_positions(data: bytes) -> dict[str, int]:
    """Byte offsets of the parts of a delta file a corruption can hit: the header length, the
    JSON header's keys and values (metadata text, its checksum, the checksums of tensors, a
    tensor's dtype, shape and offsets), and the first and last byte of every tensor."""
    n = int.from_bytes(data[:8], "little")
    text = data[8:8 + n].decode()              # the JSON header, the metadata a string in it
    header = json.loads(text)
    meta = header["__metadata__"]
    first_sum = next(iter(json.loads(meta[dc.FORMAT_NAME])["checksums"].values()))
    carried = text.index('"carry.model.norm.weight"')
    pos = {"header length, low byte": 0, "header length, high byte": 7,
           "metadata key": 8 + text.index('"deltacome"') + 1,
           "metadata checksum key": 8 + text.index(dc.META_CHECKSUM) + 10,
           "metadata checksum": 8 + text.index(meta[dc.META_CHECKSUM]),
           "version": 8 + text.index(f'\\"version\\": {dc.FORMAT_VERSION}')
           + len('\\"version\\": '),
           "a tensor checksum": 8 + text.index(first_sum) + 3,
           "carried dtype": 8 + text.index('"F16"', carried) + 1,
           "carried shape": 8 + text.index('"shape":[', carried) + len('"shape":[')}
    if text != text.rstrip():
        pos["header padding"] = 8 + len(text.rstrip())
    for name, entry in header.items():
        if name != "__metadata__" and entry["data_offsets"][1] > entry["data_offsets"][0]:
            start, stop = entry["data_offsets"]
            pos[f"{name} first byte"] = 8 + n + start
            pos[f"{name} last byte"] = 8 + n + stop - 1
    return pos


def delta_tensors(d) -> dict:
    """Every tensor of a read delta file, by a name of its own."""
    tensors = dict(d.carried)
    for name, cm in d.matrices.items():
        for k, band in enumerate(cm.bands):
            tensors[f"{name}.{k}.S"] = band.S
            for side, qv in (("U", band.U), ("V", band.V)):
                for part in ("codes", "scale", "zero"):
                    tensors[f"{name}.{k}.{side}.{part}"] = getattr(qv, part)
    return tensors


def refused_or_same(path: Path, good) -> bool:
    """read_delta_file(path) refuses the file (DeltaComeError), or reads back exactly `good`;
    any other exception fails the test."""
    try:
        d = read_delta_file(path)
    except DeltaComeError:
        return True
    a, b = delta_tensors(d), delta_tensors(good)
    return (d.meta == good.meta and a.keys() == b.keys()
            and all(dc.same_bits(a[k], b[k]) for k in a))


def test_flipped_bit_in_each_part_of_a_file_is_refused(small, tmp_path):
    """One bit flipped in each part of a checksummed file that flip_positions names: each of
    the 8 bits of a byte of the header length, the JSON header, the metadata and its
    checksum; the lowest and highest bit of every tensor's first and last byte. All refused
    (by safetensors' header checks, the structural checks or the checksums)."""
    data = small.file.delta.read_bytes()
    bad = tmp_path / "bad.safetensors"
    for part, at in flip_positions(data).items():
        for bit in (0, 7) if part.endswith(" byte") and "header" not in part else range(8):
            flipped = bytearray(data)
            flipped[at] ^= 1 << bit
            bad.write_bytes(flipped)
            try:
                read_delta_file(bad)
            except DeltaComeError:
                continue
            pytest.fail(f"accepted a flip of bit {bit} in the {part} (byte {at})")


@settings(deadline=None, max_examples=150,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(where=st.floats(0, 1, exclude_max=True), change=st.integers(1, 255), bits=st.booleans())
def test_any_single_corruption_is_refused(small, where, change, bits):
    """The property: in a file written with checksums, any one flipped bit (bits=True: the
    change is a power of two), anywhere in the file, is refused; any other change of one
    byte to another value is refused too, or (only where it turns JSON whitespace of the
    header into other whitespace) reads back exactly the same file. Changes inside a tensor's
    bytes, dtype or shape are caught by its CRC-32 (certain for any change confined to 32
    consecutive bits), changes in the metadata text by the metadata's CRC-32, changes to the
    header's structure by safetensors or the structural checks. Not covered: several
    changes far apart (CRC-32 misses about 1 in 2^32 of those), and a file rewritten whole
    with fresh checksums, which is a different, valid file."""
    data = small.file.delta.read_bytes()
    at = int(where * len(data))
    change = 1 << (change % 8) if bits else change
    flipped = bytearray(data)
    flipped[at] ^= change
    bad = small.root / "corrupt.safetensors"
    bad.write_bytes(flipped)
    if bits:
        with pytest.raises(DeltaComeError):
            read_delta_file(bad)
    else:
        assert refused_or_same(bad, read_delta_file(small.file.delta)), (at, change)


def test_truncated_or_extended_file_is_refused(small, tmp_path):
    data = small.file.delta.read_bytes()
    bad = tmp_path / "bad.safetensors"
    for cut in (data[:-1], data[:8], data + b"\0", data + data[-4:]):
        bad.write_bytes(cut)
        with pytest.raises(DeltaComeError):
            read_delta_file(bad)


def test_delta_must_fit_base_and_model(small, tmp_path):
    """What a file cannot know about itself: a carried tensor of another shape or dtype than
    BASE's, a matrix whose shape fits its own tensors (159 inputs pack like 160) but not
    BASE. In a file without checksums it reads; apply, verify and patch_model refuse it."""
    for corrupt, message in (
            (tensor_edit(lambda t: t.__setitem__("carry.model.norm.weight",
                                                 torch.ones(39).half())), "model.norm.weight"),
            (tensor_edit(lambda t: t.__setitem__("carry.model.norm.weight",
                                                 torch.ones(40, dtype=torch.int32))),
             "model.norm.weight"),
            (set_entry("shape", [40, 159]), UP.removesuffix(".weight"))):
        bad = rewrite_delta(small.file.delta, tmp_path / "bad.safetensors", corrupt)
        read_delta_file(bad)                              # the file alone cannot know
        for args in (("apply", small.file.base, bad, tmp_path / "m.safetensors"),
                     ("verify", small.file.base, bad, small.file.merged)):
            code, err = run_cli(*args)
            assert code == 2 and message in err and err.count("\n") == 1, err
        model = linear_model(small.file.base)
        state = model_state(model)
        with pytest.raises(DeltaComeError, match=message):
            kernel.patch_model(model, bad)
        assert_same_state(model, state)
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("tenants", [False, True])
def test_patch_model_is_all_or_nothing(small, tenants):
    """A valid file that does not fit the model only at its last matrix (the model's layer has
    another shape): before, the carried tensors were copied and earlier layers swapped by
    then, and a retry failed with 'already patched'. Now the model is left as it was, and a
    retry once the model fits patches it: the layer computes x (W_base + Δ̂)ᵀ."""
    delta = read_delta_file(small.file.delta)
    last = list(delta.matrices)[-1]
    path = last.removesuffix(".weight")
    model = linear_model(small.file.base)
    good = model.get_submodule(path)
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent), child, torch.nn.Linear(3, 5, bias=False))
    state = model_state(model)
    patch = (lambda m: kernel.patch_model_tenants(m, [small.file.delta] * 2, "reference")) \
        if tenants else (lambda m: kernel.patch_model(m, small.file.delta, "reference"))
    with pytest.raises(DeltaComeError, match=path):
        patch(model)
    assert_same_state(model, state)
    setattr(model.get_submodule(parent), child, good)
    assert sorted(patch(model)) == sorted(delta.matrices)
    x = torch.randn(3, good.in_features, generator=torch.Generator().manual_seed(0))
    w = good.weight.detach().float() + decompress_matrix(delta.matrices[last])
    layer = model.get_submodule(path)
    with torch.no_grad():
        y = layer(x, torch.tensor([0, 1, 0])) if tenants else layer(x)
    assert rel(y, x @ w.mT) < 1e-5
    norm = load_file(str(small.file.ft))["model.norm.weight"].float()
    assert torch.equal(model.get_submodule("model.norm").weight, norm)


def test_compress_output_onto_an_input_is_refused(small, tmp_path):
    """OUT that is BASE, FT, one of FT's shards, FT's directory or lies inside it, a link to
    BASE (symbolic or hard), or a shard that an index names outside FT's directory: refused
    in one line before anything is read or written; every input unchanged."""
    shard = sorted(small.dir.ft.glob("model-*.safetensors"))[0]
    (tmp_path / "link").symlink_to(small.file.base)
    os.link(shard, tmp_path / "hard")
    outside = tmp_path / "ft-outside"                        # an index naming ../shared.st
    outside.mkdir()
    shutil.copy(shard, tmp_path / "shared.safetensors")
    index = json.loads((small.dir.ft / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: "../shared.safetensors" if v == shard.name else v
                           for k, v in index["weight_map"].items()}
    shutil.copy(small.dir.ft / "model-00002-of-00002.safetensors", outside)
    (outside / "model.safetensors.index.json").write_text(json.dumps(index))
    before = {p: tree(p) for p in (small.file.base, small.file.ft, small.dir.base, small.dir.ft,
                                   tmp_path)}
    cases = [(small.file.base, small.file.ft, small.file.base, "is the input"),
             (small.file.base, small.file.ft, small.file.ft, "is the input"),
             (small.dir.base, small.dir.ft, shard, "lies inside the input"),
             (small.dir.base, small.dir.ft, small.dir.ft, "is the input"),
             (small.dir.base, small.dir.ft, small.dir.ft / "d.safetensors", "lies inside"),
             (small.file.base, small.file.ft, tmp_path / "link", "is the input"),
             (small.dir.base, small.dir.ft, tmp_path / "hard", "is the input"),
             (small.dir.base, outside, tmp_path / "shared.safetensors", "is the input")]
    for base, ft, out, message in cases:
        code, err = run_cli(base, ft, out, "--overwrite")
        assert code == 2 and message in err and err.count("\n") == 1, (out, err)
    assert {p: tree(p) for p in before} == before


def test_apply_output_onto_an_input_is_refused(small, tmp_path, monkeypatch):
    """apply's OUT that is BASE (file or directory), the delta file, a directory holding BASE,
    or the current directory: refused in one line; nothing changed, nothing left behind."""
    home = tmp_path / "home"
    shutil.copytree(small.dir.base, home / "base")
    shutil.copy(small.dir.delta, home / "delta.safetensors")
    monkeypatch.chdir(home)
    before = {p: tree(p) for p in (small.file.base, small.dir.base, small.file.delta, home)}
    cases = [(small.file.base, small.file.delta, small.file.base, "is the input"),
             (small.dir.base, small.dir.delta, small.dir.base, "is the input"),
             (small.file.base, small.file.delta, small.file.delta, "is the input"),
             (home / "base", "delta.safetensors", home, "contains the input"),
             (home / "base", "delta.safetensors", ".", "contains the input"),
             (small.dir.base, small.dir.delta, ".", "current directory"),
             (small.dir.base, small.dir.delta, "..", "current directory")]
    for base, delta, out, message in cases:
        code, err = run_cli("apply", base, delta, out, "--overwrite")
        assert code == 2 and message in err and err.count("\n") == 1, (out, err)
    assert {p: tree(p) for p in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_apply_refuses_another_base(small, tmp_path, kind):
    """`apply` onto a checkpoint of the same names and shapes that is not the base the delta
    was made against (here the fine-tune itself) is refused by the base's recorded probes,
    in one line, and writes nothing."""
    pair = getattr(small, kind)
    code, _, err = cli("apply", pair.ft, pair.delta, tmp_path / "out", "-q")
    assert code == 2 and "is not the base" in err and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []


def test_apply_never_replaces_what_it_did_not_write(small, tmp_path):
    """A directory of unrelated files (and subfolders) as OUT is refused, --overwrite or not;
    so is a checkpoint apply wrote once a file is added to it, and an unrelated file."""
    mine = tmp_path / "my_models"
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    (mine / "sub" / "weights.bin").write_bytes(b"\1\2")
    mine_file = tmp_path / "mine.safetensors"
    save_file({"x": torch.ones(2)}, str(mine_file))
    merged = tmp_path / "merged"
    assert run_cli("apply", small.dir.base, small.dir.delta, merged) == (0, "")
    (merged / "README.md").write_text("added by me")
    before = {p: tree(p) for p in (mine, mine_file, merged)}
    for base, delta, out in ((small.dir.base, small.dir.delta, mine),
                             (small.dir.base, small.dir.delta, merged),
                             (small.file.base, small.file.delta, mine_file)):
        for extra in ([], ["--overwrite"]):
            code, err = run_cli("apply", base, delta, out, *extra)
            assert code == 2 and "not replaced" in err and err.count("\n") == 1, err
    assert {p: tree(p) for p in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "mine.safetensors",
                                                          "my_models"]


def test_overwrite_replaces_our_own_outputs(small, tmp_path, monkeypatch):
    """compress and apply write an absent OUT or an empty directory; an output of their own
    needs --overwrite, and is then replaced whole. A failure while replacing leaves the old
    output as it was and no scratch behind."""
    for kind in ("file", "dir"):
        s = getattr(small, kind)
        delta = tmp_path / f"d-{kind}.safetensors"
        fast = ("--quantizer", "minmax")
        assert run_cli(s.base, s.ft, delta, *fast) == (0, "")
        code, err = run_cli(s.base, s.ft, delta, *fast, "--budget", "1/8")
        assert code == 2 and "pass --overwrite" in err
        assert run_cli(s.base, s.ft, delta, *fast, "--budget", "1/8", "--overwrite") == (0, "")
        assert read_delta_file(delta).meta["config"]["budget"] == 1 / 8
        merged = tmp_path / f"merged-{kind}"
        if kind == "dir":
            merged.mkdir()                                   # empty: nothing to lose
        assert run_cli("apply", s.base, s.delta, merged) == (0, "")
        first = tree(merged)
        code, err = run_cli("apply", s.base, delta, merged)
        assert code == 2 and "pass --overwrite" in err and tree(merged) == first
        assert run_cli("apply", s.base, delta, merged, "--overwrite") == (0, "")
        assert tree(merged) != first
        assert run_cli("verify", s.base, delta, merged) == (0, "")

    def failing(*args):
        raise DeltaComeError("simulated failure")
    monkeypatch.setattr(dc, "merge_shard", failing)
    before = tree(tmp_path / "merged-dir")
    code, err = run_cli("apply", small.dir.base, small.dir.delta, tmp_path / "merged-dir",
                        "--overwrite")
    assert code == 2 and "simulated failure" in err and tree(tmp_path / "merged-dir") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d-dir.safetensors",
                                                          "d-file.safetensors", "merged-dir",
                                                          "merged-file"]


def test_compress_never_replaces_an_unrelated_file(small, tmp_path):
    mine = tmp_path / "notes.safetensors"
    save_file({"x": torch.ones(2)}, str(mine))
    text = tmp_path / "notes.txt"
    text.write_text("mine")
    for out in (mine, text):
        before = tree(out)
        code, err = run_cli(small.file.base, small.file.ft, out, "--overwrite")
        assert code == 2 and "not replaced" in err and err.count("\n") == 1, err
        assert tree(out) == before


def test_example_keeps_directories_it_did_not_write(tmp_path):
    """`example DIR` writes base/ and ft/ in DIR; a base/ of the user's is never deleted."""
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "mine.txt").write_text("mine")
    args = ("example", tmp_path, "--pair-only", "--layers", "1", "--width", "32")
    for extra in ([], ["--overwrite"]):
        code, err = run_cli(*args, *extra)
        assert code == 2 and "not replaced" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]
    assert (tmp_path / "base" / "mine.txt").read_text() == "mine"
    (tmp_path / "base" / "mine.txt").unlink()
    assert run_cli(*args) == (0, "")                            # an empty base/ is fine
    code, err = run_cli(*args)
    assert code == 2 and "pass --overwrite" in err
    assert run_cli(*args, "--overwrite") == (0, "")


def checkpoint_pair(tmp_path: Path, base: dict, ft: dict) -> tuple[Path, Path]:
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(ft, str(tmp_path / "ft.safetensors"))
    return tmp_path / "base.safetensors", tmp_path / "ft.safetensors"


def test_integer_matrices_are_carried_exactly(tmp_path):
    """Matrices that --include selects but that are not floating point (int8, uint8, int32,
    bool, float8) are carried bit-exact, never compressed; uint16 tensors are carried too.
    compress, apply and verify all handle them, and the summary reports them."""
    gen = torch.Generator().manual_seed(0)
    layer = "model.layers.0."
    base = {layer + "q_proj.weight": torch.randn(32, 48, generator=gen).half(),
            layer + "i8.weight": torch.randint(-128, 128, (32, 64), generator=gen).to(torch.int8),
            layer + "u8.weight": torch.randint(0, 256, (32, 64), generator=gen).to(torch.uint8),
            layer + "i32.weight": torch.randint(-2**31, 2**31 - 1, (8, 8), generator=gen,
                                                dtype=torch.int64).to(torch.int32),
            layer + "mask.weight": torch.rand(16, 16, generator=gen) > 0.5,
            layer + "f8.weight": torch.randn(16, 32, generator=gen).to(torch.float8_e4m3fn),
            "model.u16": torch.arange(10, dtype=torch.int32).to(torch.uint16)}
    ft = {k: v.clone() for k, v in base.items()}
    ft[layer + "q_proj.weight"] += (0.1 * torch.randn(32, 48, generator=gen)).half()
    for k in ("i8", "u8", "i32"):
        ft[layer + f"{k}.weight"][0, :3] += 3
    ft[layer + "mask.weight"] = ~ft[layer + "mask.weight"]
    ft[layer + "f8.weight"] = (ft[layer + "f8.weight"].float() * 2).to(torch.float8_e4m3fn)
    ft["model.u16"] = torch.arange(1, 11, dtype=torch.int32).to(torch.uint16)
    b, f = checkpoint_pair(tmp_path, base, ft)
    summary = compress(b, f, tmp_path / "d.safetensors", FAST, progress=False)
    assert summary.not_float == {layer + "i8.weight": "int8", layer + "u8.weight": "uint8",
                                 layer + "i32.weight": "int32", layer + "mask.weight": "bool",
                                 layer + "f8.weight": "float8_e4m3fn"}
    assert "not compressed" in summary.table()
    d = read_delta_file(tmp_path / "d.safetensors")
    assert list(d.matrices) == [layer + "q_proj.weight"]
    assert all(dc.same_bits(d.carried[k], ft[k]) for k in ft if k in summary.not_float) and \
        dc.same_bits(d.carried["model.u16"], ft["model.u16"])
    assert run_cli("apply", b, tmp_path / "d.safetensors", tmp_path / "m.safetensors") == (0, "")
    merged = load_file(str(tmp_path / "m.safetensors"))
    assert all(dc.same_bits(merged[k], ft[k]) for k in ft if k != layer + "q_proj.weight")
    assert run_cli("verify", b, tmp_path / "d.safetensors", tmp_path / "m.safetensors") == (0, "")
    assert run_cli("info", tmp_path / "d.safetensors")[0] == 0


def test_empty_matrix_compresses_applies_and_verifies(tmp_path):
    gen = torch.Generator().manual_seed(0)
    base = {"model.layers.0.empty.weight": torch.zeros(0, 64).half(),
            "model.layers.0.q.weight": torch.randn(32, 32, generator=gen).half()}
    ft = {k: v + 0.01 for k, v in base.items()}
    b, f = checkpoint_pair(tmp_path, base, ft)
    d, m = tmp_path / "d.safetensors", tmp_path / "m.safetensors"
    for args in ((b, f, d, "--quantizer", "minmax"), ("info", d), ("apply", b, d, m),
                 ("verify", b, d, m)):
        assert run_cli(*args)[0] == 0, args
    assert read_delta_file(d).matrices["model.layers.0.empty.weight"].bands == []


def scaled(s_factor, u_factor=1.0):
    """A legal-looking file whose S, and U's scales and zeros, are that many times too large:
    finite, so it passes the file's checks, but W_base + Δ̂ overflows."""
    def corrupt(meta, tensors):
        for k in tensors:
            if k.endswith(".S"):
                tensors[k] *= s_factor
            if k.endswith((".U.scale", ".U.zero")):
                tensors[k] *= u_factor
        return json.dumps(meta)
    return corrupt


def test_apply_and_verify_refuse_non_finite_values(small, tmp_path):
    """apply refuses a BASE holding NaN and a W_base + Δ̂ that is not finite in BASE's dtype;
    verify refuses NaN in a rebuilt matrix, a NaN BASE, and a delta whose Δ̂ overflows fp16
    or even fp32 (where the ulp comparison meets NaN: NaN > 1 is False, so it used to pass)."""
    base_t = load_file(str(small.file.base))
    base_t[UP].view(-1)[5] = float("nan")
    nan_base = tmp_path / "nan-base.safetensors"
    save_file(base_t, str(nan_base))
    huge = rewrite_delta(small.file.delta, tmp_path / "huge.safetensors", scaled(1e30))
    inf = rewrite_delta(small.file.delta, tmp_path / "inf.safetensors", scaled(3e38, 100.0))
    merged_t = load_file(str(small.file.merged))
    merged_t[UP].view(-1)[7] = float("nan")
    nan_merged = tmp_path / "nan-merged.safetensors"
    save_file(merged_t, str(nan_merged))
    out = tmp_path / "m.safetensors"
    for args, message in ((("apply", nan_base, small.file.delta, out), "NaN or Inf"),
                          (("apply", small.file.base, huge, out), "not finite"),
                          (("verify", small.file.base, small.file.delta, nan_merged), "NaN or Inf"),
                          (("verify", nan_base, small.file.delta, small.file.merged), "NaN or Inf"),
                          (("verify", small.file.base, huge, small.file.merged), "ulp"),
                          (("apply", small.file.base, inf, out), "not finite"),
                          (("verify", small.file.base, inf, small.file.merged), "nan ulp")):
        code, err = run_cli(*args)
        assert code == 2 and message in err and err.count("\n") == 1, (args, err)
    assert not out.exists()


def test_verify_error_is_not_glued_to_the_progress_bar(small, tmp_path):
    import contextlib
    import io
    merged_t = load_file(str(small.file.merged))
    merged_t[UP].view(-1)[7] = float("nan")
    save_file(merged_t, str(tmp_path / "bad.safetensors"))
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        assert dc.main(["verify", str(small.file.base), str(small.file.delta),
                        str(tmp_path / "bad.safetensors")]) == 2
    lines = err.getvalue().splitlines()
    assert "verify" in err.getvalue() and lines[-1].startswith("deltacome: error:")
    assert sum("deltacome: error" in line for line in lines) == 1


def parse_error(*args) -> tuple[int, str]:
    """Run the CLI expecting argparse to refuse an option: (exit code, stderr)."""
    import contextlib
    import io
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_:
        dc.main([str(a) for a in args])
    return exit_.value.code, err.getvalue()


@pytest.mark.parametrize("args, message", [
    (["--group-size", "1073741824"], "multiple of 32 in 32..4096"),
    (["--group-size", "1048576"], "multiple of 32 in 32..4096"),
    (["--group-size", "48"], "multiple of 32"),
    (["--group-size", "abc"], "not an integer"),
    (["--device", "xyz"], "expected auto, cpu, cuda or cuda:N"),
    (["--device", ""], "expected auto, cpu, cuda or cuda:N"),
    (["--device", "meta"], "expected auto, cpu, cuda or cuda:N"),
    (["--device", "mps"], "expected auto, cpu, cuda or cuda:N"),
    (["--device", "cuda:99"], "cuda:99"),
    (["--budget", "-1/16"], "budget must be in (0, 1]"),
    (["--budget", "nan"], "budget must be in (0, 1]"),
    (["--widths", "2,x"], "not an integer"),
    (["--widths", "2,9"], "widths must be integers in 0..8"),
    (["--method", "8:x"], "bad band spec"),
    (["--include", "("], "bad regex"),
])
def test_options_are_checked_as_they_are_parsed(tmp_path, args, message):
    """A bad option is refused by argparse (exit 2, its message) before any file is looked
    at: BASE and FT do not even exist here."""
    missing = tmp_path / "missing"
    code, err = parse_error(missing, missing, tmp_path / "d.safetensors", *args)
    assert code == 2 and message in err and "no such file" not in err, err
    if args[0] in ("--device", "--group-size"):
        code, err = parse_error("example", tmp_path / "ex", *args)
        assert code == 2 and message in err, err
    assert list(tmp_path.iterdir()) == []


def test_api_checks_the_same_values(small, tmp_path):
    for cfg in (Config(group_size=2**30), Config(device="meta"), Config(budget=-1.0),
                Config(widths=(2, 9)), Config(quantizer="max"), Config(method="8:x")):
        with pytest.raises(DeltaComeError):
            compress(small.file.base, small.file.ft, tmp_path / "d.safetensors", cfg,
                     progress=False)
    with pytest.raises(DeltaComeError, match="expected auto"):
        apply(small.file.base, small.file.delta, tmp_path / "m.safetensors", "xyz",
              progress=False)
    assert list(tmp_path.iterdir()) == []


def test_bad_index_is_a_one_line_error(small, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(small.dir.base, ckpt)
    index = ckpt / "model.safetensors.index.json"
    for text in ('{"weight_map": ["a", "b"]}', '[1]', '{"weight_map": {"a": 3}}'):
        index.write_text(text)
        code, err = run_cli(ckpt, small.dir.ft, tmp_path / "d.safetensors")
        assert code == 2 and "index" in err and err.count("\n") == 1, (text, err)


# =============================================================================================
# Decode speed: one launch pair for layers that share an input (fused deltas), the delta
# beside the base GEMM (kernel.serving_options), and the end-to-end decode benchmark
# (bench.py --decode). Tolerances as in the kernel sections above: a fused layout runs each
# member's rows through the single-delta arithmetic.

def check_fused(outs, in_f, tenant_ranks, idx, dtype, splits, with_base, seed):
    """Members of out sizes `outs` (tenant t's member m of ranks tenant_ranks[t][m]) in one
    fused layout: each member's columns of the output against float64 and the reference."""
    cms = [[random_matrix(o, in_f, r, seed + 10 * t + m) for m, (o, r) in enumerate(zip(outs, rs))]
           for t, rs in enumerate(tenant_ranks)]
    kd = kernel.prepare_fused_delta(cms, "cpu")
    assert kd.shape == (sum(outs), in_f) and [n for _, n in kd.outputs] == list(outs)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(len(idx), in_f, generator=gen).to(dtype)
    base = torch.randn(len(idx), sum(outs), generator=gen).to(dtype) if with_base else None
    config = None if splits is None else small_config(*splits)
    y = kernel.multi_delta_matmul(x, kd, torch.tensor(idx), base, backend="triton",
                                  config=config)
    assert y.shape == (len(idx), sum(outs)) and torch.isfinite(y).all()
    assert_workspace_clean()
    rows = max(idx.count(t) for t in set(idx))
    for m, (out0, n) in enumerate(kd.outputs):
        member = [c[m] for c in cms]
        part = None if base is None else base[:, out0:out0 + n]
        want = exact(x, member, idx, part)
        ref = kernel.multi_delta_matmul(x, member, torch.tensor(idx), part, backend="reference")
        if want.norm() == 0:
            assert not y[:, out0:out0 + n].any()
            continue
        assert rel(y[:, out0:out0 + n], want) < dot_units(rows, config) * UNIT[dtype], m
        assert rel(y[:, out0:out0 + n], ref) < 8 * UNIT[dtype] + rel(ref, want)


@st.composite
def fused_cases(draw):
    members = draw(st.integers(1, 3))
    outs = [draw(st.integers(1, 140)) for _ in range(members)]
    tenants = draw(st.integers(1, 2))
    ranks = [[draw(RANKS) for _ in range(members)] for _ in range(tenants)]
    return outs, ranks, draw(st.lists(st.integers(0, tenants - 1), min_size=1, max_size=5))


@settings(max_examples=6, deadline=None)
@given(case=fused_cases(), in_f=st.integers(1, 140), bf16=st.booleans(),
       with_base=st.booleans(),
       splits=st.one_of(st.none(), st.tuples(st.integers(1, 3), st.integers(1, 3))),
       seed=st.integers(0, 2**16))
@example(case=([129, 40, 40], [[{8: 2, 2: 20}, {}, {4: 9, 1: 17}]], [0]), in_f=96,
         bf16=False, with_base=True, splits=(2, 2), seed=0)      # q/k/v with narrow k, v
@example(case=([70, 130], [[{2: 12}, {3: 5}], [{4: 7}, {8: 3, 2: 9}]], [1, 0, 1, 1, 1]),
         in_f=90, bf16=True, with_base=False, splits=None, seed=1)   # gate/up, 2 tenants
@example(case=([33, 64], [[{2: 30}, {2: 20}]], [0, 0]), in_f=257, bf16=False,
         with_base=True, splits=None, seed=2)                     # 2 rows: FMA path
def test_fused_matches_reference(case, in_f, bf16, with_base, splits, seed):
    """Fused layouts (prepare_fused_delta) vs float64, member by member: 1–3 members of
    awkward output sizes (a member need not start at a tile or group boundary; members of
    rank 0), 1–2 tenants, batch 1–5 (FMA and tl.dot paths), forced splits, fused base."""
    outs, ranks, idx = case
    check_fused(outs, in_f, ranks, idx, torch.bfloat16 if bf16 else torch.float16, splits,
                with_base, seed)


def test_fused_items_cover_each_member():
    """Phase-U items of a fused layout: every member's outputs are covered by its own tiles
    (its output columns, its tile index for the words), numbered apart for the counters,
    and a member's items hold only its bands."""
    outs = (100, 37, 37)
    cms = [random_matrix(o, 64, r, 50 + m) for m, (o, r) in
           enumerate(zip(outs, ({8: 20, 2: 40}, {3: 5}, {})))]
    kd = kernel.prepare_fused_delta([cms], "cpu")
    assert kd.outputs == ((0, 100), (100, 37), (137, 37)) and kd.u_groups == 1
    table, n, tiles = kd.u_items(32, 16)
    by_member = {}
    for c, wbase, _, r, tile, lo, hi, _, _, _, count_tile, count, out0, n_out, *_ in \
            table[:n].tolist():
        by_member.setdefault(out0, []).append((tile, count_tile, r, count, n_out))
    assert sorted(by_member) == [0, 100, 137]
    assert {t for items in by_member.values() for _, t, _, _, _ in items} == set(range(tiles))
    assert tiles == sum(-(-o // 32) for o in outs)
    for out0, items in by_member.items():
        n_out = dict(kd.outputs)[out0]
        assert {t for t, _, _, _, _ in items} == set(range(-(-n_out // 32)))
        assert {n for *_, n in items} == {n_out}
    assert {r for _, _, r, _, _ in by_member[0]} == {20, 40}         # q's bands only
    assert {r for _, _, r, _, _ in by_member[137]} == {0}            # rank 0: empty items


def test_fused_errors():
    a, b = random_matrix(10, 20, {2: 3}, 60), random_matrix(12, 21, {2: 3}, 61)
    with pytest.raises(ValueError, match="one input size"):
        kernel.prepare_fused_delta([[a, b]], "cpu")
    with pytest.raises(ValueError, match="shape"):
        kernel.prepare_fused_delta([[a, a], [a, random_matrix(11, 20, {2: 3}, 62)]], "cpu")
    with pytest.raises(ValueError, match="at least one"):
        kernel.prepare_fused_delta([[]], "cpu")


def test_launch_base_callable_in_place():
    """launch() takes the base output as a callable, called once (between its phases), and
    adds the delta into it in place: the overlap path's contract."""
    cm = random_matrix(70, 50, {4: 6, 2: 10}, 63)
    kd = kernel.prepare_delta(cm, "cpu")
    x = torch.randn(3, 50, generator=torch.Generator().manual_seed(63)).half()
    base = torch.randn(3, 70, generator=torch.Generator().manual_seed(64)).half()
    calls = []

    def make_base():
        calls.append(1)
        return base.clone()
    y = kernel.launch(x, kd, kernel.single_plan(kd, 3, "cpu"), make_base, None, in_place=True)
    assert len(calls) == 1
    assert rel(y, exact(x, [cm], [0, 0, 0], base)) < 2 * UNIT[torch.float16]
    assert torch.equal(kernel.run_overlapped(x, make_base, lambda b: kernel.launch(
        x, kd, kernel.single_plan(kd, 3, "cpu"), b, None, in_place=True)), y)
    with pytest.raises(ValueError, match="in_place"):
        kernel.launch(x, kd, kernel.single_plan(kd, 3, "cpu"), None, None, in_place=True)


def test_serving_options_groups_siblings():
    """serving_options fuses patched siblings named in SHARED_INPUTS: q/k/v as one group, not
    gate/up where only one of them is patched; it refuses a model with no patched layers."""
    blk = torch.nn.Module()
    blk.self_attn, blk.mlp = torch.nn.Module(), torch.nn.Module()
    for parent, name, out_f in (("self_attn", "q_proj", 16), ("self_attn", "k_proj", 8),
                                ("self_attn", "v_proj", 8), ("mlp", "gate_proj", 24),
                                ("mlp", "up_proj", 24)):
        layer = torch.nn.Linear(16, out_f, bias=False)
        if name != "up_proj":
            layer = kernel.DeltaLinear(layer, random_matrix(out_f, 16, {2: 3}, out_f))
        setattr(getattr(blk, parent), name, layer)
    assert kernel.serving_options(blk, fuse=True) == 1
    group = blk.self_attn.q_proj.group
    assert group is blk.self_attn.v_proj.group and group.layers[1] is blk.self_attn.k_proj
    assert blk.mlp.gate_proj.group is None and not blk.mlp.gate_proj.overlap
    assert kernel.serving_options(blk, fuse=True, overlap=True) == 1
    assert blk.self_attn.k_proj.group is group and blk.self_attn.k_proj.overlap  # kept
    assert kernel.serving_options(blk, overlap=True) == 0
    assert blk.self_attn.q_proj.group is None and blk.mlp.gate_proj.overlap
    with pytest.raises(ValueError, match="no patched layers"):
        kernel.serving_options(torch.nn.Linear(2, 2))


@pytest.mark.slow
def test_serving_options_patched_model(tmp_path, monkeypatch):
    """patch_model's serving options on a one-block Llama, Triton interpreted: overlap runs
    the plain path's launches (bit-equal logits on one CPU stream); fuse makes q/k/v (q 64
    outputs, k and v 16) and gate/up one launch pair each, 4 a block instead of 7; every
    option's logits match the merged model's (as in test_patched_model_matches_merged)."""
    transformers = pytest.importorskip("transformers")
    base_dir, ft_dir = make_example(tmp_path / "pair", layers=1, width=64)
    compress(base_dir, ft_dir, tmp_path / "delta.safetensors", Config(device="cpu"),
             progress=False)
    apply(base_dir, tmp_path / "delta.safetensors", tmp_path / "merged", "cpu", progress=False)
    load = transformers.AutoModelForCausalLM.from_pretrained
    model = load(base_dir, dtype=torch.float16).eval()
    kernel.patch_model(model, tmp_path / "delta.safetensors", backend="triton")
    launches = []
    real_launch = kernel.launch

    def counted(*args, **kwargs):
        launches.append(args[1].outputs)
        return real_launch(*args, **kwargs)
    monkeypatch.setattr(kernel, "launch", counted)
    ids = torch.randint(0, 512, (2, 5), generator=torch.Generator().manual_seed(0))
    logits = {}
    for fuse, overlap in ((False, False), (False, True), (True, True)):
        assert kernel.serving_options(model, fuse, overlap) == (2 if fuse else 0)
        launches.clear()
        with torch.no_grad():
            logits[fuse, overlap] = model(ids).logits.double()
        assert len(launches) == (4 if fuse else 7)
    assert ((0, 64), (64, 16), (80, 16)) in launches
    assert all(m._prepared is None for m in model.modules()
               if isinstance(m, kernel.DeltaLinear) and m.group is not None)
    assert torch.equal(logits[False, True], logits[False, False])
    with torch.no_grad():
        want = load(tmp_path / "merged", dtype=torch.float16).eval()(ids).logits.double()
    for got in logits.values():
        assert rel(got, want) < 1e-2
    assert rel(logits[True, True], logits[False, False]) < 2e-3


def test_serving_options_tenants(monkeypatch):
    """MultiDeltaLinear siblings q/k/v (40, 24 and 24 outputs, 2 tenants of different band
    layouts) under use_tenants with fuse and overlap: one launch pair for the three, and
    each row's output is its tenant's (float64 product plus the base), as on the plain
    path."""
    attn = torch.nn.Module()
    gen = torch.Generator().manual_seed(70)
    cms = {}
    for name, out_f in (("q_proj", 40), ("k_proj", 24), ("v_proj", 24)):
        base = torch.nn.Linear(48, out_f).half()
        cms[name] = [random_matrix(out_f, 48, r, 71 + out_f + t)
                     for t, r in enumerate(({8: 2, 2: 12}, {4: 6}))]
        setattr(attn, name, kernel.MultiDeltaLinear(base, cms[name], backend="triton"))
    blk = torch.nn.Module()
    blk.self_attn = attn
    x = torch.randn(3, 2, 48, generator=gen).half()
    tenants = [1, 0, 1]
    launches = []
    real_launch = kernel.launch
    monkeypatch.setattr(kernel, "launch", lambda *a, **k: launches.append(1) or
                        real_launch(*a, **k))
    outs = {}
    for fuse, overlap in ((False, False), (True, True)):
        assert kernel.serving_options(blk, fuse, overlap) == int(fuse)
        launches.clear()
        with torch.no_grad(), kernel.use_tenants(blk, tenants):
            outs[fuse] = {n: getattr(attn, n)(x) for n in cms}
        assert len(launches) == (1 if fuse else 3)
    rows = [t for t in tenants for _ in range(2)]
    for name, layer in ((n, getattr(attn, n)) for n in cms):
        with torch.no_grad():
            base = layer.base(x).reshape(6, -1)
        want = exact(x.reshape(6, 48), cms[name], rows, base)
        for fuse in (False, True):
            assert rel(outs[fuse][name].reshape(6, -1), want) < 2 * UNIT[torch.float16]


def test_decoder_matches_transformers():
    """bench.py's decode loop (its own static KV cache and step) against transformers on a
    tiny random Llama with grouped-query attention, fp32, prompts left-padded by 0, 2 and 5
    tokens: the prompt's logits at every real position, then greedy tokens vs generate()."""
    pytest.importorskip("transformers")
    import bench
    model = bench.llama_model(bench.DECODE_CPU, "cpu", torch.float32)
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    prompts = torch.randint(1, 128, (3, 7), generator=torch.Generator().manual_seed(3))
    pad = torch.tensor([0, 2, 5])
    real = torch.arange(7)[None] >= pad[:, None]                            # (3, 7)
    dec = bench.Decoder(model, prompts, pad, 6)
    q, keys = torch.arange(7)[:, None], torch.arange(7 + 6)                # cache columns
    mask = (keys <= q) & ((keys >= pad[:, None, None]) | (keys == q))       # (3, 7, 13)
    with torch.no_grad():
        mine = bench.llama_forward(model, prompts, (q.mT - pad[:, None]).clamp_min(0),
                                   q[:, 0], mask[:, None], dec.k, dec.v, last=False)
        theirs = model(prompts, attention_mask=real.long()).logits
    assert torch.allclose(mine[real], theirs[real], atol=1e-4, rtol=1e-4)
    tokens = dec.run()
    want = model.generate(input_ids=prompts, attention_mask=real.long(), max_new_tokens=6,
                          do_sample=False, pad_token_id=0)[:, 7:]
    assert torch.equal(tokens, want)


def test_agreement_counts_until_eos():
    import bench
    want = torch.tensor([[5, 2, 9, 9], [1, 1, 1, 1]])                      # EOS = 2
    got = torch.tensor([[5, 2, 0, 0], [1, 0, 1, 1]])
    a = bench.agreement(got, want, 2)
    assert a == dict(positions=6, share=5 / 6, rows_equal=0.5)
    assert bench.agreement(want, want, None)["share"] == 1.0


def test_bench_decode_runs_on_cpu(tmp_path, monkeypatch):
    """bench.py --decode on CPU (tiny model, reference backend, eager steps): every row of
    the model and tenant sections, the ratios to the merged model, served tokens equal to
    the merged model's (fp32), a failing configuration recorded while the others run, and
    the options checked at parse time."""
    pytest.importorskip("transformers")
    import bench

    if torch.cuda.is_available():
        pytest.skip("on CUDA this is the GPU benchmark, not a test")
    path = tmp_path / "d.json"
    assert bench.main(["--decode", "--sections", "model,tenants", "--batches", "1,2",
                       "--tenants", "2", "--levers", "plain,fuse+overlap", "--prompt-len", "5",
                       "--new-tokens", "3", "--tenant-new-tokens", "3", "--merged-copies", "2",
                       "--json", str(path)]) == 0
    res = json.loads(path.read_text())["decode"]
    assert not res["errors"] and set(res["seconds"]) == {"model", "tenants"}
    assert [(r["way"], r["lever"], r["batch"]) for r in res["model"]] == [
        ("base", None, 1), ("base", None, 2), ("served", "plain", 1), ("served", "plain", 2),
        ("served", "fuse+overlap", 1), ("served", "fuse+overlap", 2), ("merged", None, 1),
        ("merged", None, 2)]
    for r in res["model"]:
        assert r["ms_per_token"] > 0 and r["x_merged"] > 0 and r["kv_gb"] > 0
        assert (r["deltas_gb"] > 0) == (r["way"] == "served")
        if r["way"] != "base":
            assert r["tokens_vs_merged"] == 1.0
    tenants = res["tenants"]
    assert [(r["tenants"], r["lever"]) for r in tenants["rows"]] == [(2, "plain")]
    assert tenants["separate"]["measured_models"] == 2 and tenants["rows"][0]["x_separate"] > 0
    # one configuration's failure is recorded in its row; the others still run
    real_row = bench.decode_row
    monkeypatch.setattr(bench, "decode_row", lambda dec, graph, rows, **f: (
        1 / 0 if f.get("lever") == "fuse" else real_row(dec, graph, rows, **f)))
    assert bench.main(["--decode", "--sections", "model", "--batches", "1", "--levers",
                       "plain,fuse", "--prompt-len", "3", "--new-tokens", "2",
                       "--json", str(path)]) == 1
    rows = json.loads(path.read_text())["decode"]["model"]
    assert ["error" in r for r in rows] == [False, False, True, False]
    assert "ZeroDivisionError" in rows[2]["error"] and rows[1]["x_merged"] > 0
    for bad in (["--levers", "fast"], ["--sections", "all"], ["--new-tokens", "1"],
                ["--batches", "0"], ["--pair", "a", "b", "c"]):
        with pytest.raises(SystemExit) as e:
            bench.main(["--decode", *bad])
        assert e.value.code == 2


def test_bench_decode_profile_table(capsys):
    """The decode profile's table: per-kind µs from the profile, the delta kernels' launches
    per step, mean µs per launch and read rate (stored GB / their µs); rows without a
    profile or with a failed one are left out."""
    import bench
    profile = dict(steps=16, us_per_step=580.0, top=[],
                   kinds={"delta phase V": 20.0, "delta phase U": 60.0, "GEMM (cuBLAS)": 500.0},
                   launches={"delta phase V": 4, "delta phase U": 4, "GEMM (cuBLAS)": 7})
    rows = [dict(way="served", lever="fuse", batch=1, deltas_gb=0.04, profile=profile),
            dict(way="merged", lever=None, batch=1, deltas_gb=0.0),
            dict(way="base", lever=None, batch=1, deltas_gb=0.0, profile=dict(error="x"))]
    bench.print_profiles(rows)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and lines[2].split()[:3] == ["served", "fuse", "B=1"]
    assert lines[2].split()[3:] == ["500", "20", "60", "0", "0", "580", "8", "10.0", "500"]
    bench.print_profiles(rows[1:])
    assert capsys.readouterr().out == ""


def test_bench_layer_rows_levers(monkeypatch):
    """The whole-layer rows (a block of patched projections, each serving option): every
    option's outputs checked against the reference before timing, one row per batch. On CPU
    the layers run the reference backend and a CPU timer stands in for the CUDA-graph one."""
    import bench
    monkeypatch.setattr(bench, "time_us", lambda calls, graph: bench.cpu_time_us(calls[0], 1))
    m = dict(bench.DECODE_CPU, layers=1)
    protos = bench.prototypes(m, "cpu", {})
    rows = bench.layer_rows({"tiny": m}, (1, 3), torch.float32, torch.device("cpu"), protos)
    assert [r["batch"] for r in rows] == [1, 3] and not any(r["fail"] for r in rows)
    for r in rows:
        assert list(r["levers"]) == list(bench.LEVERS) and r["base_us"] > 0
        assert all(v["rel_err"] < 1e-5 and v["us"] > 0 for v in r["levers"].values())


def test_bench_decode_pair_on_cpu(tmp_path):
    """bench.py --decode --pair on a tiny real triple (eval.py's tiny base with a character
    tokenizer; a fine-tune of its projections, compressed and applied): the served model's
    greedy tokens equal the merged model's, free-running and teacher-forced (fp32)."""
    pytest.importorskip("transformers")
    from safetensors.torch import load_file, save_file

    import bench

    if torch.cuda.is_available():
        pytest.skip("on CUDA this is the GPU benchmark, not a test")
    base, ft = tmp_path / "base", tmp_path / "ft"
    ev.build_tiny_base(base, hidden=64, layers=2)
    shutil.copytree(base, ft)
    gen = torch.Generator().manual_seed(7)
    for shard in ft.glob("*.safetensors"):
        tensors = load_file(shard)
        for name, w in tensors.items():
            if ".layers." in name and w.ndim == 2:
                tensors[name] = w + synthetic_delta(*w.shape, gen, scale=0.5).to(w.dtype)
        save_file(tensors, shard, {"format": "pt"})
    compress(base, ft, tmp_path / "d.safetensors", Config(device="cpu"), progress=False)
    apply(base, tmp_path / "d.safetensors", tmp_path / "merged", "cpu", progress=False)
    path = tmp_path / "pair.json"
    assert bench.main(["--decode", "--sections", "pair", "--pair", str(base),
                       str(tmp_path / "d.safetensors"), str(tmp_path / "merged"),
                       "--pair-prompts", "3", "--pair-new-tokens", "4", "--levers", "plain",
                       "--json", str(path)]) == 0
    pair = json.loads(path.read_text())["decode"]["pair"]
    assert pair["prompts"] == 3 and [r["way"] for r in pair["rows"]] == ["merged", "served"]
    served = pair["rows"][1]
    assert served["free_running"]["positions"] > 0
    assert served["free_running"]["share"] == served["teacher_forced"]["share"] == 1.0


# =============================================================================================
# Activation-aware compression (--calib): the H-norm steps against their calibration-free
# counterparts, the budget, and the CLI on a tiny transformers model.

def anisotropic_gram(n, seed=0, tokens=400):
    """H = XᵀX/tokens of correlated inputs: a spectrum falling by e⁶ in a random basis."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n, generator=gen) * torch.linspace(3, -3, n).exp()
    x = x @ torch.linalg.qr(torch.randn(n, n, generator=gen))[0]
    return x.mT @ x / tokens


def h_error(delta, approx, H):
    """‖Δ − Δ̂‖²_H / ‖Δ‖²_H: the squared relative output error on inputs with Gram H."""
    e = delta - approx
    return float(((e @ H) * e).sum() / ((delta @ H) * delta).sum())


def test_identity_h_reduces_to_calibration_free():
    """With H = I every calibrated step is its calibration-free counterpart: the same error
    model, the same widths, GPTQ feeds nothing forward, the same refit."""
    delta = long_tailed(96, 160, seed=3)
    U, S, V = dc.svd_delta(delta, 40, "gram")
    H = dc.damp(torch.eye(160))
    widths = (0, 2, 3, 8)
    plain = dc.vector_errors(U, V, widths)
    assert torch.allclose(dc.vector_errors(U, V, widths, H=H), plain, rtol=1e-5, atol=1e-9)
    spans = [(8, 0, 3), (3, 3, 10), (2, 10, 40)]
    for q, (bits, a, b) in zip(dc.gptq_quantize(V.mT, spans, H), spans):
        r = quantize_vectors(V[:, a:b].mT, bits)
        assert torch.equal(q.codes, r.codes) and torch.equal(q.scale, r.scale)
    for cfg in (Config(budget=1 / 16, device="cpu"), Config(method="paper", device="cpu"),
                Config(budget=1 / 32, refit=False, quantizer="minmax", device="cpu")):
        free, ident = dc.compress_matrix(delta, cfg), dc.compress_matrix(delta, cfg, H=torch.eye(160))
        assert [(b.bits, b.rank) for b in free.bands] == [(b.bits, b.rank) for b in ident.bands]
        assert torch.allclose(decompress_matrix(free), decompress_matrix(ident), atol=1e-5)


def test_weighted_svd_is_the_best_rank_r_in_the_h_norm():
    delta, H = long_tailed(64, 96, seed=1), dc.damp(anisotropic_gram(96))
    U, S, V = dc.svd_weighted(delta, H, 12)
    approx = (U * S) @ V.mT
    assert torch.allclose(approx, U @ U.mT @ delta, atol=1e-6)
    assert torch.allclose(V.norm(dim=0), torch.ones(12), atol=1e-5)
    # Eckart–Young in the H-norm: the optimum's error is the tail of ΔL's spectrum
    L = torch.linalg.cholesky(H).float()
    tail = torch.linalg.svdvals(delta @ L)[12:].square().sum()
    assert math.isclose(float((((delta - approx) @ H.float()) * (delta - approx)).sum()),
                        float(tail), rel_tol=1e-3)
    U0, S0, V0 = dc.svd_delta(delta, 12)
    assert h_error(delta, approx, H.float()) < h_error(delta, (U0 * S0) @ V0.mT, H.float())


@pytest.mark.parametrize("seed", range(3))
def test_gptq_lowers_the_h_error_of_rounding(seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.linalg.qr(torch.randn(200, 30, generator=gen))[0].mT            # 30 unit rows
    H = dc.damp(anisotropic_gram(200, seed)).float()
    spans = [(4, 0, 5), (2, 5, 30)]
    gptq = torch.cat([dc.dequantize_vectors(q) for q in dc.gptq_quantize(x, spans, H.double())])
    rtn = torch.cat([dc.dequantize_vectors(quantize_vectors(x[a:b], bits))
                     for bits, a, b in spans])
    err = [float((((x - q) @ H) * (x - q)).sum()) for q in (gptq, rtn)]
    assert err[0] < 0.8 * err[1], err


@settings(deadline=None, max_examples=15)
@given(out_f=st.integers(16, 200), in_f=st.integers(16, 200), seed=st.integers(0, 1000),
       budget=st.sampled_from([1 / 8, 1 / 16, 1 / 32, 1 / 64]),
       method=st.sampled_from(["greedy", "paper", "2:*"]))
@example(out_f=16, in_f=200, seed=0, budget=1 / 64, method="greedy")
def test_calibrated_compression_fits_budget(out_f, in_f, seed, budget, method):
    delta, H = long_tailed(out_f, in_f, seed), anisotropic_gram(in_f, seed, tokens=64)
    H[:, 0] = H[0, :] = 0                                       # an input that is never active
    try:
        cm = dc.compress_matrix(delta, Config(budget=budget, method=method, device="cpu"), H=H)
    except DeltaComeError as e:
        assert "less than one singular vector" in str(e)
        return
    assert cm.nbytes() <= dc.budget_bytes(out_f, in_f, budget)
    approx = decompress_matrix(cm)
    assert torch.isfinite(approx).all()
    assert h_error(delta, approx, dc.damp(H).float()) < 1.0


def test_allocation_takes_free_upgrades():
    """3- and 4-bit codes share a 4-bit container, so 3 -> 4 bits costs nothing. With the
    H-norm's ε, vector 0 may prefer 3 bits to 4 and cap vector 1 at 3 until vector 0 moves on
    to 8; vector 1's upgrade to 4 is then free (it divided by zero once)."""
    eps = torch.tensor([[1.0, 0.2, 0.05, 0.1, 0.0],
                        [1.0, 0.2, 0.1, 0.05, 0.0]], dtype=torch.float64)
    widths, costs = [0, 2, 3, 4, 8], [0, 10, 20, 20, 40]
    assert dc.allocate_bits(torch.tensor([1.0, 0.9]), eps, costs, widths, 60) == [8, 4]


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """A random 2-block Llama (hidden 64, character tokenizer) and a fine-tune of it with
    long-tailed deltas; calibration and held-out token ids drawn from 8 of its tokens, so
    that the layer inputs are far from isotropic."""
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("tiny")
    base, ft = root / "base", root / "ft"
    ev.build_tiny_base(base, hidden=64, layers=2)
    shutil.copytree(base, ft)
    tensors = load_file(str(ft / "model.safetensors"))
    gen = torch.Generator().manual_seed(0)
    for name, w in tensors.items():
        if w.ndim == 2 and ".layers." in name:
            tensors[name] = w + 5 * dc.synthetic_delta(*w.shape, gen)
    save_file(tensors, str(ft / "model.safetensors"), {"format": "pt"})
    for name, seed in (("calib", 1), ("held", 2)):
        ids = torch.randint(3, 11, (12, 64), generator=torch.Generator().manual_seed(seed))
        save_file({"input_ids": ids}, str(root / f"{name}.safetensors"))
    return SimpleNamespace(root=root, base=base, ft=ft, calib=root / "calib.safetensors",
                           held=root / "held.safetensors")


def test_calib_lowers_output_error_on_held_out_inputs(tiny_pair, tmp_path):
    p = tiny_pair
    free, calib = tmp_path / "free.safetensors", tmp_path / "calib.safetensors"
    assert run_cli(p.base, p.ft, free, "--budget", "1/32", "--device", "cpu") == (0, "")
    assert run_cli(p.base, p.ft, calib, "--budget", "1/32", "--device", "cpu",
                   "--calib", p.calib) == (0, "")
    runner = dc.BlockRunner(p.ft, p.held, 10**6, torch.device("cpu"))
    held = {n: H for i in range(len(runner.blocks)) for n, H in runner.grams(i).items()}
    runner.close()
    b, f = load_file(str(p.base / "model.safetensors")), load_file(str(p.ft / "model.safetensors"))
    errors = {}
    for label, path in (("free", free), ("calib", calib)):
        d = read_delta_file(path)
        assert d.meta["config"]["calib"] == ("" if label == "free" else str(p.calib))
        assert len(d.matrices) == 14
        for name, cm in d.matrices.items():
            assert cm.nbytes() <= dc.budget_bytes(*cm.shape, 1 / 32)    # the same budget
        errors[label] = sum(h_error(f[n] - b[n], decompress_matrix(cm), held[n])
                            for n, cm in d.matrices.items()) / len(d.matrices)
    assert errors["calib"] < 0.7 * errors["free"], errors


def test_calib_from_texts(tiny_pair, tmp_path):
    p = tiny_pair
    texts = tmp_path / "texts.jsonl"
    texts.write_text("\n".join(json.dumps({"text": f"{i} + {i * 7} = {i * 8}"}) for i in range(200)))
    out = tmp_path / "d.safetensors"
    assert run_cli(p.base, p.ft, out, "--device", "cpu", "--calib", texts,
                   "--calib-tokens", "1000") == (0, "")
    assert read_delta_file(out).meta["config"]["calib_tokens"] == 1000
    ids = dc.load_calibration(texts, p.ft, 1000, 10**6)
    assert ids.shape[0] * ids.shape[1] <= 1000 and ids.shape[1] == min(dc.CALIB_WINDOW, 1000)


def test_bad_calibration_is_a_one_line_error(tiny_pair, tmp_path, pair, monkeypatch):
    p = tiny_pair
    files = {"no_ids.safetensors": {"tokens": torch.zeros(2, 8, dtype=torch.long)},
             "float.safetensors": {"input_ids": torch.zeros(2, 8)},
             "vocab.safetensors": {"input_ids": torch.full((2, 8), 10**6)},
             "negative.safetensors": {"input_ids": torch.full((2, 8), -1)},
             "empty_ids.safetensors": {"input_ids": torch.zeros(0, 8, dtype=torch.long)}}
    for name, tensors in files.items():
        save_file(tensors, str(tmp_path / name))
    (tmp_path / "empty.safetensors").write_bytes(b"")
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": 3}\n')
    (tmp_path / "words.txt").write_text("some text to calibrate on")
    (tmp_path / "ids.csv").write_text("1,2,3")
    example_base, example_ft = pair["sharded"]                  # no tokenizer, no model code
    out = tmp_path / "out" / "d.safetensors"
    out.parent.mkdir()
    cases = [((p.base, p.ft, "no_ids.safetensors"), "no tensor 'input_ids'"),
             ((p.base, p.ft, "float.safetensors"), "must be integer token ids"),
             ((p.base, p.ft, "vocab.safetensors"), "outside FT's vocabulary"),
             ((p.base, p.ft, "negative.safetensors"), "outside FT's vocabulary"),
             ((p.base, p.ft, "empty_ids.safetensors"), "no calibration tokens"),
             ((p.base, p.ft, "empty.safetensors"), "not a readable safetensors file"),
             ((p.base, p.ft, "empty.txt"), "no calibration tokens"),
             ((p.base, p.ft, "bad.jsonl"), "bad.jsonl:2: expected a JSON object"),
             ((p.base, p.ft, "missing.safetensors"), "no such file"),
             ((p.base, p.ft, "ids.csv"), "expected a .safetensors, .txt or .jsonl"),
             ((example_base, example_ft, "words.txt"), "has none"),
             ((p.base, p.ft / "model.safetensors", "vocab.safetensors"), "config.json")]
    for (base, ft, calib), message in cases:
        code, err = run_cli(base, ft, out, "--device", "cpu", "--calib", tmp_path / calib)
        assert code == 2 and message in err and err.count("\n") == 1, (calib, err)
    code, err = parse_error(p.base, p.ft, out, "--calib", p.calib, "--calib-tokens", "0")
    assert code == 2 and "--calib-tokens" in err and "positive integer" in err
    monkeypatch.setitem(sys.modules, "transformers", None)       # not installed
    code, err = run_cli(p.base, p.ft, out, "--device", "cpu", "--calib", p.calib)
    assert code == 2 and "needs the transformers package" in err and err.count("\n") == 1
    assert list(out.parent.iterdir()) == []


# =============================================================================================
# Serving real full fine-tunes as tenants: vocabulary tensors (embeddings, lm_head) in the delta
# file (compressed, or changed rows stored whole), the whole-file ratio, resized vocabularies,
# and per-tenant norms, biases, embeddings and lm_head in one batch.

def make_fine_tune(base_dir, out_dir, seed, changes, added=0, tied=False):
    """A fine-tune of `base_dir` (a make_example pair's base) in out_dir. changes: a subset of
    projections (long-tailed deltas, 5 % of the weights as in make_tenants), norms (±20 %),
    embed_rows (the first 24 rows of the embedding), embed_all (a long-tailed delta of the whole
    embedding), head (the same of an untied lm_head); `added` rows appended to the embedding and
    the untied head (a resized vocabulary: config vocab_size follows). Returns out_dir."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(base_dir, out_dir)
    gen = torch.Generator().manual_seed(seed)
    for shard in sorted(out_dir.glob("*.safetensors")):
        tensors = load_file(shard)
        for name, w in list(tensors.items()):
            big = (".layers." in name and w.ndim == 2 and "projections" in changes
                   or "embed" in name and "embed_all" in changes
                   or "lm_head" in name and "head" in changes)
            if big:
                w = (w.float() + synthetic_delta(*w.shape, gen, scale=0.5)).to(w.dtype)
            elif "norm" in name and "norms" in changes:
                w = (w.float() * (1 + 0.2 * torch.randn(w.shape, generator=gen))).to(w.dtype)
            elif "embed" in name and "embed_rows" in changes:
                w = w.clone()
                w[:24] += 0.05 * torch.randn(24, w.shape[1], generator=gen).to(w.dtype)
            if added and ("embed" in name or "lm_head" in name):
                w = torch.cat([w, 0.02 * torch.randn(added, w.shape[1], generator=gen).to(w.dtype)])
            tensors[name] = w
        save_file(tensors, shard, {"format": "pt"})
    config = json.loads((out_dir / "config.json").read_text())
    config["vocab_size"] += added
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return out_dir


def tie_example(base_dir, out_dir):
    """make_example's base with a tied lm_head: the checkpoint drops lm_head.weight."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(base_dir, out_dir)
    for shard in sorted(out_dir.glob("*.safetensors")):
        tensors = load_file(shard)
        if tensors.pop("lm_head.weight", None) is not None:
            save_file(tensors, shard, {"format": "pt"})
    index = out_dir / "model.safetensors.index.json"
    blob = json.loads(index.read_text())
    blob["weight_map"].pop("lm_head.weight")
    index.write_text(json.dumps(blob))
    config = json.loads((out_dir / "config.json").read_text())
    (out_dir / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    return out_dir


@pytest.fixture(scope="module")
def full_tenants(tmp_path_factory):
    """A tiny untied base and 3 full fine-tunes compressed and merged: tenant 0 changed
    everything (projections, norms, 24 embedding rows, lm_head), tenant 1 only its
    projections, tenant 2 its projections, norms and its whole embedding. Returns
    (base_dir, [delta file], [merged dir])."""
    root = tmp_path_factory.mktemp("full")
    base_dir, _ = make_example(root / "pair", layers=1, width=64)
    changes = [{"projections", "norms", "embed_rows", "head"}, {"projections"},
               {"projections", "norms", "embed_all"}]
    deltas, merged = [], []
    for k, ch in enumerate(changes):
        ft = make_fine_tune(base_dir, root / f"ft{k}", 200 + k, ch)
        deltas.append(root / f"d{k}.safetensors")
        compress(base_dir, ft, deltas[-1], Config(device="cpu"), progress=False)
        merged.append(apply(base_dir, deltas[-1], root / f"m{k}", "cpu", progress=False))
    return base_dir, deltas, merged


def test_vocabulary_storage_and_whole_file_ratio(full_tenants, tmp_path):
    """What each tenant's file holds, by --vocab auto: 24 changed embedding rows take fewer
    bytes than the compressed matrix would (stored whole), a whole changed embedding or
    lm_head does not (compressed); the summary's kinds add up to the file, and the whole-file
    ratio is every byte of the file over 2 bytes per element of every tensor of FT."""
    base_dir, deltas, _ = full_tenants
    d0, d1, d2 = (read_delta_file(d) for d in deltas)
    assert list(d0.rows) == ["model.embed_tokens.weight"] and d0.role("lm_head.weight") == "vocab"
    assert d0.rows["model.embed_tokens.weight"].index.tolist() == list(range(24))
    assert not d1.rows and not any(d1.role(n) == "vocab" for n in d1.matrices) and not d1.carried
    assert d2.role("model.embed_tokens.weight") == "vocab" and "lm_head.weight" not in d2.matrices
    ft = dc.CheckpointReader(base_dir.parent.parent / "ft0")
    whole = 2 * sum(ft.get(n).numel() for n in ft.names())
    rows = dc.storage(d0.meta, dc.tensor_sizes(deltas[0]), deltas[0].stat().st_size)
    assert d0.meta["whole_fp16_bytes"] == whole == rows[-1].fp16_bytes
    assert rows[-1].stored_bytes == deltas[0].stat().st_size
    assert sum(r.fp16_bytes for r in rows[:-1]) == whole              # every tensor, once
    header = 8 + int.from_bytes(deltas[0].read_bytes()[:8], "little")
    assert sum(r.stored_bytes for r in rows[:-1]) + header == deltas[0].stat().st_size
    text = dc.info(deltas[0])
    assert f"{deltas[0].stat().st_size / whole:.4f}" in text and "rows: 24 changed" in text
    # forced choices: rows store every changed row (all of lm_head's), carry the whole tensors
    ft0 = base_dir.parent.parent / "ft0"
    for vocab in ("rows", "carry", "compress"):
        out = tmp_path / f"{vocab}.safetensors"
        compress(base_dir, ft0, out, Config(device="cpu", vocab=vocab, include="q_proj"),
                 progress=False)
        d = read_delta_file(out)
        kinds = {n: ("rows" if n in d.rows else "carry" if n in d.carried else d.role(n))
                 for n in ("model.embed_tokens.weight", "lm_head.weight")}
        assert set(kinds.values()) == {{"rows": "rows", "carry": "carry",
                                        "compress": "vocab"}[vocab]}
    with pytest.raises(SystemExit, match="2"):                       # argparse: one line, 2
        run_cli(base_dir, ft0, tmp_path / "x.safetensors", "--vocab", "nope")


def test_version_1_file_still_loads(full_tenants, tmp_path):
    """A file written before the vocabulary kinds (format version 1: projections and carried
    tensors only, no recorded sizes or probes) reads, applies, patches and says what it lacks."""
    from safetensors import safe_open
    transformers = pytest.importorskip("transformers")
    base_dir, deltas, _ = full_tenants
    with safe_open(str(deltas[1]), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()["deltacome"])
    old = {k: meta[k] for k in ("format", "group_size", "config", "matrices", "carried")}
    old["version"] = 1
    for m in old["matrices"].values():
        m.pop("role")
    save_file(tensors, str(tmp_path / "v1.safetensors"), {"deltacome": json.dumps(old)})
    d = read_delta_file(tmp_path / "v1.safetensors")
    assert d.meta["version"] == 1 and not d.rows and len(d.matrices) == 7
    assert "not recorded (version-1 file)" in dc.info(tmp_path / "v1.safetensors")
    apply(base_dir, tmp_path / "v1.safetensors", tmp_path / "merged", "cpu", progress=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    assert len(kernel.patch_model(model, tmp_path / "v1.safetensors", backend="reference")) == 7


def test_row_and_embedding_lookups_match_reference():
    """The batched lookups against their references, 4 tenants, rows unsorted and repeated:
    embedding_delta (Û's codes gathered per token, every width, a rank-0 tenant and one
    without a delta) vs embedding_delta_reference; RowTable vs a loop over rows; a
    MultiDeltaLinear's bias and row terms vs the same per row."""
    cms = [random_matrix(300, 40, {8: 2, 3: 5, 2: 9}, 1), random_matrix(300, 40, {}, 2), None,
           random_matrix(300, 40, {4: 3, 1: 7}, 3)]
    ids = torch.tensor([299, 0, 5, 128, 127, 7, 299, 33])
    trow = torch.tensor([3, 0, 3, 0, 2, 1, 0, 3])
    for dtype in (torch.float32, torch.float16):
        table = kernel.prepare_embedding_deltas(cms, "cpu", dtype)
        got = kernel.embedding_delta(ids, trow, table, kernel.plan_tenants(trow, 4, "cpu"))
        for b in range(len(ids)):
            cm = cms[int(trow[b])]
            want = kernel.embedding_delta_reference(ids[b:b + 1], cm, dtype) if cm else 0 * got[b]
            assert got.dtype == dtype and rel(got[b], want) < (1e-6 if dtype == torch.float32
                                                               else 1e-3), (b, dtype)
    gen = torch.Generator().manual_seed(4)
    rds = [(torch.tensor([0, 3, 9]), torch.randn(3, 5, generator=gen)), None,
           (torch.tensor([3, 4]), torch.randn(2, 5, generator=gen))]
    table = kernel.RowTable(10, rds)
    ids, trow = torch.tensor([3, 3, 9, 4, 0]), torch.tensor([0, 2, 0, 1, 2])
    x, y = torch.randn(5, 5, generator=gen), torch.randn(5, 10, generator=gen)
    looked, added = table.lookup(ids, trow), table.add_products(y, x, trow)
    for b, (i, t) in enumerate(zip(ids.tolist(), trow.tolist())):
        dense = torch.zeros(10, 5)
        if rds[t] is not None:
            dense[rds[t][0]] = rds[t][1]
        assert torch.equal(looked[b], dense[i])
        assert torch.allclose(added[b], y[b] + dense @ x[b], atol=1e-6)
    cm = [random_matrix(10, 5, r, 5 + t) for t, r in enumerate(({2: 3}, {4: 2}, {}))]
    bias = torch.randn(3, 10, generator=gen)
    lin = kernel.MultiDeltaLinear(torch.nn.Linear(5, 10), cm, "reference", bias, rds)
    with torch.no_grad():
        got = lin(x, trow)
        for b, t in enumerate(trow.tolist()):
            dense = torch.zeros(10, 5)
            if rds[t] is not None:
                dense[rds[t][0]] = rds[t][1]
            want = lin.base(x[b]) + x[b] @ (decompress_matrix(cm[t]) + dense).mT + bias[t]
            assert rel(got[b], want) < 1e-6


@pytest.mark.parametrize("backend", ["reference", slow("triton")])
def test_full_tenants_match_their_merged_fine_tunes(full_tenants, backend, monkeypatch):
    """Three full fine-tunes in one batch (rows unsorted, tenant 0 of 3 used alone in a second
    batch): each row's logits match its own merged fine-tune (apply) within 1e-2 relative, as
    a single patched fine-tune does (see test_multi_tenant_model_matches_merged), and are far
    (≥ 10× that) from every other tenant's: per-tenant norms, embedding (rows stored whole,
    compressed, none) and lm_head (compressed, none) are each row's own."""
    transformers = pytest.importorskip("transformers")
    base_dir, deltas, merged = full_tenants
    dtype = torch.float32 if backend == "reference" else torch.float16
    load = transformers.AutoModelForCausalLM.from_pretrained
    model = load(base_dir, dtype=dtype).eval()
    names = kernel.patch_model_tenants(model, deltas, backend=backend)
    kinds = {n: type(model.get_submodule(n.removesuffix(".weight"))).__name__ for n in names}
    assert kinds["model.embed_tokens.weight"] == "MultiDeltaEmbedding"
    assert kinds["model.norm.weight"] == "MultiNorm"
    assert kinds["lm_head.weight"] == "MultiDeltaLinear"
    ids = torch.randint(0, 512, (5, 6), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = torch.arange(5) * 5                   # tokens among the 24 changed rows
    wants = [load(m, dtype=dtype).eval() for m in merged]
    plans = []                                   # one plan a batch serves every tenant layer
    monkeypatch.setattr(kernel, "plan_tenants",
                        lambda *a, make=kernel.plan_tenants: plans.append(a) or make(*a))
    for tenants in (torch.tensor([2, 0, 1, 0, 2]), torch.tensor([0, 0, 0, 0, 0])):
        with torch.no_grad(), kernel.use_tenants(model, tenants):
            got = model(ids).logits.double()                                  # (5, 6, vocab)
        for t in tenants.unique().tolist():
            rows = (tenants == t).nonzero().squeeze(1)
            with torch.no_grad():
                logits = [w(ids[rows]).logits.double() for w in wants]
            err = rel(got[rows], logits[t])
            assert err < 1e-2, (t, err)
            assert all(rel(got[rows], logits[u]) > 10 * err for u in range(3) if u != t)
    assert len(plans) == 2


def test_tied_head_tenants(tmp_path):
    """Tied lm_head: the checkpoint holds only the embedding, whose delta (every row changed,
    so compressed) is each tenant's head delta too. Two tenants in one batch match their merged
    fine-tunes; a single patch_model (merged embedding, shared by the head) does as well."""
    transformers = pytest.importorskip("transformers")
    base_dir = tie_example(make_example(tmp_path / "pair", layers=1, width=64)[0],
                           tmp_path / "base")
    deltas, merged = [], []
    for k, ch in enumerate([{"projections", "embed_all"}, {"embed_all", "norms"}]):
        ft = make_fine_tune(base_dir, tmp_path / f"ft{k}", 300 + k, ch)
        deltas.append(tmp_path / f"d{k}.safetensors")
        compress(base_dir, ft, deltas[-1], Config(device="cpu"), progress=False)
        assert read_delta_file(deltas[-1]).role("model.embed_tokens.weight") == "vocab"
        merged.append(apply(base_dir, deltas[-1], tmp_path / f"m{k}", "cpu", progress=False))
    load = transformers.AutoModelForCausalLM.from_pretrained
    model = load(base_dir, dtype=torch.float32).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    names = kernel.patch_model_tenants(model, deltas, backend="reference")
    assert "lm_head.weight" in names and isinstance(model.lm_head, kernel.MultiDeltaLinear)
    ids = torch.randint(0, 512, (4, 5), generator=torch.Generator().manual_seed(1))
    tenants = torch.tensor([1, 0, 0, 1])
    with torch.no_grad():
        with kernel.use_tenants(model, tenants):
            got = model(ids).logits.double()
        single = load(base_dir, dtype=torch.float32).eval()
        kernel.patch_model(single, deltas[1], backend="reference")
        for t in (0, 1):
            rows = (tenants == t).nonzero().squeeze(1)
            want = load(merged[t], dtype=torch.float32).eval()(ids[rows]).logits.double()
            other = load(merged[1 - t], dtype=torch.float32).eval()(ids[rows]).logits.double()
            assert rel(got[rows], want) < 1e-2 and rel(got[rows], other) > 10 * rel(got[rows], want)
            if t == 1:
                assert rel(single(ids[rows]).logits.double(), want) < 1e-2


def test_resized_vocabulary_round_trip(tmp_path):
    """A fine-tune that added 8 tokens (512 -> 520 rows in the embedding and the untied lm_head,
    config vocab_size 520): compress stores the shared rows as usual and the added rows whole;
    apply rebuilds 520-row tensors and FT's config, which from_pretrained loads; patch_model
    grows the base model's embedding and head and gives the merged model's logits; tenants of
    one model refuse it (one line, model unchanged)."""
    transformers = pytest.importorskip("transformers")
    base_dir, _ = make_example(tmp_path / "pair", layers=1, width=64)
    ft = make_fine_tune(base_dir, tmp_path / "ft", 400, {"projections", "embed_rows", "head"},
                        added=8)
    out = tmp_path / "d.safetensors"
    assert run_cli(base_dir, ft, out) == (0, "")
    d = read_delta_file(out)
    emb, head = d.rows["model.embed_tokens.weight"], d.rows["lm_head.weight"]
    assert emb.shape == (520, 64) and emb.index.tolist() == [*range(24), *range(512, 520)]
    assert head.index.tolist() == list(range(512, 520))
    assert d.matrices["lm_head.weight"].shape == (512, 64)
    assert list(d.files) == ["config.json"]
    assert run_cli("apply", base_dir, out, tmp_path / "merged") == (0, "")
    assert run_cli("verify", base_dir, out, tmp_path / "merged") == (0, "")
    load = transformers.AutoModelForCausalLM.from_pretrained
    merged = load(tmp_path / "merged", dtype=torch.float32).eval()
    ft_model = load(ft, dtype=torch.float32).eval()
    assert merged.config.vocab_size == 520
    ft_r = dc.CheckpointReader(ft)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        got = merged.state_dict()[name]
        assert torch.equal(got[512:], ft_r.get(name)[512:])             # added rows, exact
    ids = torch.tensor([[515, 3, 519, 7, 100]])
    model = load(base_dir, dtype=torch.float32).eval()
    kernel.patch_model(model, out, backend="reference")
    assert model.model.embed_tokens.num_embeddings == 520 and model.config.vocab_size == 520
    with torch.no_grad():
        got, want = model(ids).logits, merged(ids).logits
        assert got.shape == (1, 5, 520) and rel(got, want) < 1e-2       # fp16 merged weights
        assert rel(want, ft_model(ids).logits) < 0.5                    # Δ̂ approximates Δ
    tenant_model = load(base_dir, dtype=torch.float32).eval()
    before = {k: v.clone() for k, v in tenant_model.state_dict().items()}
    with pytest.raises(DeltaComeError, match="resizes the vocabulary"):
        kernel.patch_model_tenants(tenant_model, [out])
    assert all(torch.equal(v, before[k]) for k, v in tenant_model.state_dict().items())


class ScaledNorm(torch.nn.Module):
    """n(x) ⊙ (1 + weight), Gemma's form: not weight ⊙ n(x) + bias."""

    def __init__(self, dim):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        return x / x.norm(dim=-1, keepdim=True) * (1 + self.weight)


def test_tenant_bad_input_is_one_line_and_leaves_the_model(full_tenants, tmp_path):
    """Tenants of different bases, a delta file made for another model, a norm that is not
    weight ⊙ n(x) + bias: one-line DeltaComeError naming the tensor, and the model unchanged."""
    transformers = pytest.importorskip("transformers")
    base_dir, deltas, _ = full_tenants
    other_base, _ = make_example(tmp_path / "other", layers=1, width=64, seed=9)
    other_ft = make_fine_tune(other_base, tmp_path / "oft", 500, {"projections"})
    compress(other_base, other_ft, tmp_path / "other.safetensors", Config(device="cpu"),
             progress=False)
    load = transformers.AutoModelForCausalLM.from_pretrained
    model = load(base_dir, dtype=torch.float32).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cases = [([deltas[0], tmp_path / "other.safetensors"], "made against different base"),
             ([tmp_path / "other.safetensors"], "not those of the base")]
    for files, message in cases:
        with pytest.raises(DeltaComeError, match=message) as e:
            kernel.patch_model_tenants(model, files)
        assert "\n" not in str(e.value) and "tensor model." in str(e.value)
        assert not any(isinstance(m, kernel.TenantModule) for m in model.modules())
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(DeltaComeError, match="not those of the base"):
        kernel.patch_model(model, tmp_path / "other.safetensors")
    model.model.norm = ScaledNorm(64)
    with pytest.raises(DeltaComeError, match="model.norm: a ScaledNorm whose output is not"):
        kernel.check_affine_norm(model.model.norm, "model.norm")
    kernel.check_affine_norm(torch.nn.LayerNorm(64), "layer_norm")       # w ⊙ n(x) + b: fine


@pytest.mark.slow
def test_serve_tenants_on_tiny_model(tmp_path, monkeypatch):
    """eval.py's serving stage end to end on the smoke model (tied embeddings, char tokenizer):
    two fine-tunes compressed with --vocab auto and carry, each evaluated merged, patched alone
    and as tenants in one mixed batch. In fp32 on the reference the mixed batch changes no
    completion of either task (its logits differ from the single tenant's in the last bits)."""
    pytest.importorskip("transformers")
    pytest.importorskip("reasoning_gym")
    tasks = ("chain_sum", "letter_counting")
    cfg = ev.RunConfig(tasks=tasks, train=ev.TrainConfig(steps=8, batch=8, warmup=2), n_test=6,
                       tiny=True)
    ev.make_pair(tmp_path / "work", cfg, None, log=lambda m: None)
    for d in ("base", *(f"ft-{t}" for t in tasks)):
        # 8 steps teach EOS and whitespace only: suppress the specials and whitespace (ids 0-8)
        f = tmp_path / "work" / d / "generation_config.json"
        f.write_text(json.dumps({**json.loads(f.read_text()), "suppress_tokens": list(range(9))}))
    plans = []
    monkeypatch.setattr(kernel, "plan_tenants",
                        lambda *a, make=kernel.plan_tenants: plans.append(a[0].numel()) or make(*a))
    res = ev.serve_tenants(tmp_path / "work", tmp_path / "out",
                           ev.ServeConfig(tasks, vocab=("auto", "carry"), n_test=6),
                           log=lambda m: None)
    for t in tasks:
        rows = res["tasks"][t]["rows"]
        assert rows["auto"]["file_bytes"] < rows["carry"]["file_bytes"]
        for row in rows.values():
            assert row["same_completions"] == 1.0 and any(row["sample"])
            assert row["tenants"]["acc"] == row["patch_model"]["acc"]
            assert all(0 <= row[k]["acc"] <= 1 and row[k]["n"] == 6
                       for k in ("merged", "patch_model", "tenants"))
    # generate's prefill (12 rows × prompt length) and its decoding steps (12 rows) have a plan
    # each, made once: on the reference only the compressed embedding (auto) asks for one
    assert len(plans) == 2 and plans[1] == 12
    table = (tmp_path / "out" / "serve_table.txt").read_text()
    assert table.count("chain_sum") == 2 and "letter_counting" in table and "± " in table


def test_grow_vocabulary_keeps_a_tied_head_tied():
    """patch_model's resize of a tied model: the embedding and lm_head keep one weight, both
    grow, config.vocab_size follows, and the logits have the new rows."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config).eval()
    old = model.model.embed_tokens.weight.detach().clone()
    kernel.grow_parameter(model, model.model.embed_tokens.weight,
                          torch.cat([old, torch.zeros(3, 32)]))
    emb, head = model.model.embed_tokens, model.lm_head
    assert emb.weight is head.weight and emb.weight.shape == (43, 32)
    assert emb.num_embeddings == 43 and head.out_features == 43 and config.vocab_size == 43
    assert torch.equal(emb.weight[:40], old) and not emb.weight[40:].any()
    with torch.no_grad():
        assert model(torch.tensor([[41, 3, 42]])).logits.shape == (1, 3, 43)


# =============================================================================================
# Vocabulary entries of a delta file (stored rows, added rows, side files) are validated on
# read like the rest: each corruption below is refused in one line by read_delta_file.

def vocabulary_delta(tmp_path) -> Path:
    """A delta file with stored rows: an untied embedding whose fine-tune changed 3 rows and
    added 2 (a resized vocabulary), and FT's config.json that says so."""
    gen = torch.Generator().manual_seed(1)
    base = {"model.embed_tokens.weight": torch.randn(12, 32, generator=gen).half(),
            "model.layers.0.mlp.up_proj.weight": torch.randn(40, 32, generator=gen).half()}
    ft = {"model.embed_tokens.weight": torch.cat([base["model.embed_tokens.weight"],
                                                  torch.randn(2, 32, generator=gen).half()]),
          "model.layers.0.mlp.up_proj.weight": (base["model.layers.0.mlp.up_proj.weight"].float()
                                                + synthetic_delta(40, 32, gen)).half()}
    ft["model.embed_tokens.weight"][[1, 4, 7]] += 0.5
    for name, tensors, vocab in (("base", base, 12), ("ft", ft, 14)):
        (tmp_path / name).mkdir()
        save_file(tensors, str(tmp_path / name / "model.safetensors"))
        (tmp_path / name / "config.json").write_text(json.dumps({"vocab_size": vocab}))
    out = tmp_path / "delta.safetensors"
    compress(tmp_path / "base", tmp_path / "ft", out, Config(vocab="rows", device="cpu"),
             progress=False)
    return out


VOCAB_CORRUPTIONS = {       # case: (corruption, what the error names)
    "count off by one": (meta_edit(lambda m: m["rows"][EMB].update(count=4)),
                         "the metadata implies"),
    "base rows past the shape": (meta_edit(lambda m: m["rows"][EMB].update(base_rows=15)),
                                 "'base_rows'"),
    "values in int": (meta_edit(lambda m: m["rows"][EMB].update(dtype="int32")), "'dtype'"),
    "index not ascending": (tensor_edit(lambda t: t.update({f"rows.{EMB}.index": t[
        f"rows.{EMB}.index"].flip(0).contiguous()})), "not ascending"),
    "an added row missing": (tensor_edit(lambda t: t.update({f"rows.{EMB}.index": torch.tensor(
        [1, 4, 7, 11, 12], dtype=torch.int32)})), "are not all stored"),
    "side file not a config": (meta_edit(lambda m: m.update(files=["../evil.py"])), "'files'"),
    "role unknown": (meta_edit(lambda m: m["matrices"][UP0].update(role="head")), "'role'"),
    "rows and carried": (meta_edit(lambda m: m["carried"].append(EMB)), "carried"),
}
EMB, UP0 = "model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight"


@pytest.mark.parametrize("case", sorted(VOCAB_CORRUPTIONS))
def test_corrupt_vocabulary_entries_are_refused(tmp_path, case):
    delta = vocabulary_delta(tmp_path)
    good = read_delta_file(rewrite_delta(delta, tmp_path / "good.safetensors"))
    assert good.rows[EMB].index.tolist() == [1, 4, 7, 12, 13] and "config.json" in good.files
    corrupt, message = VOCAB_CORRUPTIONS[case]
    bad = rewrite_delta(delta, tmp_path / "bad.safetensors", corrupt)
    with pytest.raises(DeltaComeError, match=re.escape(message)) as e:
        read_delta_file(bad)
    assert "\n" not in str(e.value)


# =============================================================================================
# A teaching reference: the simple kernel's wrappers and errors, choose_config's contract,
# and the greedy allocation against low-rank at equal bytes.

def test_simple_kernel_wrappers_and_errors():
    """backend="simple" through delta_matmul (fp32 x too), DeltaLinear, MultiDeltaLinear
    and multi_delta_matmul; what it refuses, in one line each."""
    cms = [random_matrix(10, 20, {8: 1, 2: 3}, seed=50), random_matrix(10, 20, {4: 2}, seed=51)]
    x = torch.randn(3, 20, generator=torch.Generator().manual_seed(52))
    want = exact(x, cms, [0, 0, 0])
    assert rel(kernel.delta_matmul(x, cms[0], backend="simple"), want) < 4 * 2.0**-24
    lin = kernel.DeltaLinear(torch.nn.Linear(20, 10), cms[0], backend="simple")
    multi = kernel.MultiDeltaLinear(torch.nn.Linear(20, 10), cms, backend="simple")
    with torch.no_grad():
        assert rel(lin(x) - lin.base(x), want) < 1e-5
        assert rel(multi(x, [1, 0, 1]) - multi.base(x), exact(x, cms, [1, 0, 1])) < 1e-5
    with pytest.raises(ValueError, match="fp16, bf16 or fp32"):
        kernel.delta_matmul(x.double(), cms[0], backend="simple")
    with pytest.raises(ValueError, match="simple backend needs the CompressedMatrix"):
        kernel.delta_matmul(x.half(), kernel.prepare_delta(cms[0], "cpu"), backend="simple")
    with pytest.raises(ValueError, match="simple backend takes tenant_idx"):
        kernel.multi_delta_matmul(x.half(), cms, plan=kernel.plan_tenants([0, 1, 1], 2, "cpu"),
                                  backend="simple")
    with pytest.raises(ValueError, match="one of 'auto', 'triton', 'simple', 'reference'"):
        kernel.MultiDeltaLinear(torch.nn.Linear(20, 10), cms, backend="fast")


def stand_in_delta(out_f, in_f, rank, tenants=1):
    """What choose_config reads of a KernelDelta, for deltas too large to build here: one
    2-bit band of `rank` a tenant."""
    return SimpleNamespace(shape=(out_f, in_f), group_size=128, max_rank=rank,
                           bands=[[kernel.BandLayout(2, rank, *[0] * 8)]] * tenants,
                           device_bytes=(rank * (out_f + in_f) // 4,) * tenants)


@settings(max_examples=3, deadline=None)
@given(out_f=st.integers(1, 32768), in_f=st.integers(1, 32768), rank=st.integers(1, 2048),
       tenants=st.integers(1, 64), batch=st.integers(1, 32), sms=st.integers(1, 160),
       seed=st.integers(0, 2**16))
@example(out_f=28672, in_f=8192, rank=1921, tenants=1, batch=1, sms=132, seed=0)
@example(out_f=4096, in_f=4096, rank=616, tenants=1, batch=2, sms=132, seed=1)
@example(out_f=1024, in_f=4096, rank=246, tenants=1, batch=2, sms=132, seed=2)
@example(out_f=8192, in_f=28672, rank=1921, tenants=1, batch=16, sms=132, seed=3)
@example(out_f=4096, in_f=11008, rank=900, tenants=64, batch=1, sms=132, seed=4)
def test_choose_config_gives_the_right_product_anywhere(out_f, in_f, rank, tenants, batch,
                                                        sms, seed):
    """choose_config's rules are tuning (docs/PERFORMANCE.md); its contract is that any
    shape, rank, batch, tenant count and GPU size get a configuration under which the tuned
    kernels compute the right product. Its pick for a delta of real size (the examples: the
    70B, 7B, 1024-output and tenant launches at batch 1, 2 and 16), run on a delta small
    enough to interpret, against the float64 product."""
    config = kernel.choose_config(stand_in_delta(out_f, in_f, rank, tenants),
                                  kernel.block_rows(batch), sms, n_seg=tenants)
    cm = random_matrix(64, 160, {8: 3, 4: 6, 2: 20}, seed)
    x = torch.randn(batch, 160, generator=torch.Generator().manual_seed(seed)).half()
    y = kernel.delta_matmul(x, kernel.prepare_delta(cm, "cpu"), backend="triton", config=config)
    want = x.double() @ decompress_matrix(cm).double().mT
    assert rel(y, want) < dot_units(batch, config) * UNIT[torch.float16], config
    assert_workspace_clean()


@settings(max_examples=6, deadline=None)
@given(out_f=st.integers(16, 160), in_f=st.integers(16, 160), seed=st.integers(0, 1000),
       alpha=st.sampled_from([0.5, 1.0, 2.0, 3.0]),
       budget=st.sampled_from([1 / 64, 1 / 32, 1 / 16, 1 / 8]))
@example(out_f=210, in_f=128, seed=9, alpha=3.0, budget=1 / 16)     # a steep spectrum: 0.83
@example(out_f=64, in_f=200, seed=1, alpha=0.5, budget=1 / 64)
def test_greedy_never_worse_than_low_rank_at_equal_bytes(out_f, in_f, seed, alpha, budget):
    """An upper bound on greedy's error: at the same bytes it is never worse than keeping
    the top-k singular triplets in fp16 (the greedy search can spend the same bytes on 8-bit
    vectors, twice as many). It holds for deltas with a noise floor, as real and synthetic
    ones have; an exactly rank-k delta would be kept exactly by low-rank fp16 and rounded
    to 8 bits by greedy."""
    delta = dc.synthetic_delta(out_f, in_f, torch.Generator().manual_seed(seed), alpha=alpha)
    low_rank = ev.lowrank_fp16(delta, budget)
    if low_rank is None:                          # not one fp16 triplet fits: nothing to bound
        return
    greedy = ev.reconstruct("greedy", delta, budget)
    assert greedy.nbytes <= dc.budget_bytes(out_f, in_f, budget)
    assert dc.relative_error(delta, greedy.delta_hat) <= dc.relative_error(delta,
                                                                            low_rank.delta_hat)


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


def empty_matrix(delta, cfg, dtype, H=None):
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
             (("info", string_version), "corrupt metadata: 'version' is '1', not an integer"),
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
    shards = list((tmp_path / "merged").glob("*.safetensors"))
    assert shards
    for shard in shards:
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
    del meta["dtypes"], meta["checksums"]           # version 1 had neither
    save_file(load_file(str(new)), str(old), {"deltacome": json.dumps({**meta, "version": 1})})
    for delta in (new, old):
        assert cli("apply", base, delta, tmp_path / delta.stem, "-q")[0] == 0
        assert cli("verify", base, delta, tmp_path / delta.stem, "-q")[0] == 0
    shards = list((tmp_path / "v1").glob("*.safetensors"))
    assert shards
    for shard in shards:
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


@pytest.mark.parametrize("argv, says", [
    (["smoke", "W", "--budgets", "1/0"], "--budgets"),
    (["matrices", "--base", "b", "--ft", "f", "--layers", "a"], "--layers takes"),
    (["tables", "missing.json"], "no such results file")])
def test_eval_bad_options_are_one_line_errors(argv, says, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        ev.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and says in err.splitlines()[-1] and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


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
