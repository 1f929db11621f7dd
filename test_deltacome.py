"""Property tests for deltacome: quantizer bounds, packing round trips, allocation invariants,
reconstruction bounds, the file format, the CLI end to end, and its errors on bad input.

Run: python -m pytest -q
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import deltacome as dc

SETTINGS = settings(deadline=None, max_examples=40,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


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


@pytest.mark.parametrize("alpha", [0.7, 1.0, 1.5])
@pytest.mark.parametrize("budget", [1 / 32, 1 / 16, 1 / 8])
def test_greedy_beats_paper_preset(alpha, budget):
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
                  ["--budget", "0.03", "--widths", "1,2,4", "--no-refit"], ["--svd", "lowrank"], ["--svd", "gram"],
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
    "dtype": (lambda t: t.__setitem__(first_matrix(t), t[first_matrix(t)].float()), "dtype"),
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
