"""Tests of eval.py: baselines at their byte budgets, the matrix table, and the model-level
pipeline on a tiny random model (no downloads; skipped without transformers/reasoning-gym)."""

import json
import math

import pytest
import torch

import deltacome as dc
import eval as ev


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
        if method == "plain low-bit" or (method in ("BitDelta", "low-rank fp16") and budget < 1 / 16):
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
