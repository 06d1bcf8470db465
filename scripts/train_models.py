"""Build the two default models modelfleet ships, fully offline, on CPU.

1. A byte-level BPE tokenizer (vocab 4096) trained on the local Python
   standard library sources (``*.py``; ``test/``, ``tests/`` and
   ``site-packages`` excluded; ~2% of files held out by a CRC32 hash).
2. ``tiny-code-llama``: a small ``LlamaForCausalLM`` (hidden 256, 6 layers,
   8 heads / 4 KV heads) trained from scratch on packed 256-token sequences.
3. ``tiny-code-llama-draft``: a 2-layer ``LlamaForCausalLM`` distilled from
   the target (KL(target || draft) + a little cross-entropy); it is the draft
   model for speculative decoding.

Both are saved as bfloat16 safetensors together with the tokenizer files, and
the held-out metrics are written to ``models/README.md``.

Rerun (from the repository root, ~30 minutes on 2 CPU cores)::

    .venv/bin/python scripts/train_models.py

Training is bounded by wall-clock budgets (``--target-minutes``,
``--draft-minutes``), so the step count depends on the machine; the log prints
the steps taken, and ``--target-steps`` / ``--draft-steps`` replay a fixed
number of steps (same seed, same data order, same schedule) instead.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sysconfig
import time
import zlib
from collections.abc import Callable
from pathlib import Path

# The 2 cores are shared with other work: OpenMP threads that sleep instead of spin-waiting
# keep throughput sane under contention (~8% slower on an idle machine). Must precede torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '### ' + message['role'] + ':\\n' + message['content'] + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '### assistant:\\n' }}{% endif %}"
)
TARGET_DIR, DRAFT_DIR = "tiny-code-llama", "tiny-code-llama-draft"
SAMPLE_PROMPT = "def fibonacci(n):"
EXCLUDED_DIRS = {"test", "tests", "site-packages"}
LossFn = Callable[[torch.Tensor], torch.Tensor]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_corpus(val_percent: int) -> tuple[list[str], list[str]]:
    """Return (train_texts, val_texts) from the stdlib sources, in sorted path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted((p for p in root.rglob("*.py") if p.is_file()), key=lambda p: p.relative_to(root).as_posix())
    train: list[str] = []
    val: list[str] = []
    for path in files:
        rel = path.relative_to(root)
        if EXCLUDED_DIRS.intersection(rel.parts[:-1]):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            continue
        if zlib.crc32(rel.as_posix().encode()) % 100 < val_percent:
            val.append(text)
        else:
            train.append(text)
    log(
        f"corpus: {root} -> {len(train)} train files, {len(val)} val files "
        f"({sum(map(len, train)) / 1e6:.1f}M / {sum(map(len, val)) / 1e6:.2f}M chars)"
    )
    return train, val


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[UNK, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    assert [tok.token_to_id(t) for t in (UNK, BOS, EOS)] == [0, 1, 2]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 1)]
    )
    return tok


def save_tokenizer(tok: Tokenizer, folder: Path, max_len: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    for name, obj in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
        (folder / name).write_text(json.dumps(obj, indent=2) + "\n")


def token_stream(tok: Tokenizer, texts: list[str]) -> torch.Tensor:
    """Pack documents as ``<s> doc </s> <s> doc </s> ...`` into one id tensor."""
    ids: list[int] = []
    for enc in tok.encode_batch(texts):  # post-processor prepends <s>
        ids.extend(enc.ids)
        ids.append(2)
    return torch.tensor(ids, dtype=torch.long)


def llama(vocab: int, hidden: int, layers: int, heads: int, kv: int, ffn: int, max_pos: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=max_pos,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def adamw(model: torch.nn.Module, lr: float) -> torch.optim.AdamW:
    """AdamW (betas 0.9/0.95), weight decay 0.1 on matrices only."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95)
    )


def write_legacy_config_keys(folder: Path) -> None:
    """Add ``torch_dtype`` and top-level ``rope_theta`` for readers predating transformers v5."""
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(torch_dtype="bfloat16", rope_theta=cfg["rope_parameters"]["rope_theta"])
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def train_loop(
    model: LlamaForCausalLM, stream: torch.Tensor, args: argparse.Namespace, name: str, loss_fn: LossFn
) -> int:
    """AdamW + warmup/cosine; progress = step/steps if ``--{name}-steps`` else elapsed/budget."""
    lr, minutes, steps = (getattr(args, f"{name}_{k}") for k in ("lr", "minutes", "steps"))
    opt = adamw(model, lr)
    gen = torch.Generator().manual_seed(args.seed)
    budget, start, step, last_log, ema = minutes * 60, time.time(), 0, 0.0, None
    model.train()
    while True:
        elapsed = time.time() - start
        progress = step / steps if steps else elapsed / budget
        if progress >= 1.0:
            break
        warm = args.warmup
        scale = (
            progress / warm
            if progress < warm
            else 0.1 + 0.45 * (1 + math.cos(math.pi * (progress - warm) / (1 - warm)))
        )
        for group in opt.param_groups:
            group["lr"] = lr * scale
        starts = torch.randint(0, len(stream) - args.seq_len, (args.batch_size,), generator=gen)
        batch = torch.stack([stream[s : s + args.seq_len] for s in starts.tolist()])
        loss = loss_fn(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if time.time() - last_log > 60 or step == 1:
            last_log = time.time()
            tps = step * args.batch_size * args.seq_len / max(last_log - start, 1e-9)
            log(
                f"{name} step {step} loss {ema:.3f} lr {lr * scale:.2e} "
                f"{tps:.0f} tok/s {(last_log - start) / 60:.1f} min"
            )
    log(f"{name}: {step} steps in {(time.time() - start) / 60:.1f} min, loss(ema) {ema:.3f}")
    model.eval()
    return step


def save_model(model: LlamaForCausalLM, folder: Path, tok: Tokenizer, max_len: int) -> None:
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2)
    model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    model.to(torch.float32)
    write_legacy_config_keys(folder)
    save_tokenizer(tok, folder, max_len)


@torch.no_grad()
def evaluate(
    target: LlamaForCausalLM, draft: LlamaForCausalLM, batches: list[torch.Tensor]
) -> tuple[float, float, float, int]:
    """Mean CE per token of both models and their teacher-forced argmax agreement."""
    ce_t = ce_d = agree = count = 0.0
    for x in batches:
        lt, ld = target(input_ids=x).logits[:, :-1], draft(input_ids=x).logits[:, :-1]
        y = x[:, 1:].reshape(-1)
        ce_t += F.cross_entropy(lt.reshape(-1, lt.size(-1)), y, reduction="sum").item()
        ce_d += F.cross_entropy(ld.reshape(-1, ld.size(-1)), y, reduction="sum").item()
        agree += (lt.argmax(-1) == ld.argmax(-1)).sum().item()
        count += y.numel()
    return ce_t / count, ce_d / count, agree / count, int(count)


README = """# modelfleet default models

Generated by `scripts/train_models.py` (seed {a.seed}); do not edit by hand.
Rerun from the repository root (~30 min on 2 CPU cores, fully offline):

```bash
.venv/bin/python scripts/train_models.py
```

Both models are `LlamaForCausalLM` (bfloat16 safetensors, tied embeddings, RoPE theta
10000, max positions {a.max_len}) trained on the Python standard library sources of the
build machine ({n_train} train files, {n_val} held-out files). They share one byte-level
BPE tokenizer (vocab {a.vocab_size}; `<unk>`=0, `<s>`=1 = BOS, prepended automatically,
`</s>`=2 = EOS; no pad token) that round-trips code exactly. `tokenizer_config.json`
carries a simple chat template (`### user:` / `### assistant:`), but these are
code-completion models: they never saw chat data.

| folder | hidden | layers | heads/kv | ffn | params | weights | steps | held-out loss |
|---|---|---|---|---|---|---|---|---|
{rows}

- Held-out loss: mean cross-entropy (nats/token) over {tokens:,} predicted tokens
  ({seqs} sequences of {a.seq_len} tokens from the held-out files).
- Draft greedy agreement with the target (teacher-forced argmax match on the same
  held-out tokens): **{agreement:.1%}**. The draft was distilled from the target with
  KL(target || draft) + {a.ce_weight} x cross-entropy.
- Training: AdamW (wd 0.1, betas 0.9/0.95), warmup + cosine, float32, batch
  {a.batch_size} x {a.seq_len} tokens, `torch.set_num_threads({a.threads})`; wall-clock budgets:
  target {a.target_minutes} min at lr {a.target_lr}, draft {a.draft_minutes} min at lr {a.draft_lr}.
  Replay this run's step counts with `--target-steps {t_steps} --draft-steps {d_steps}`.

Sample (target, greedy, 48 new tokens, `generate(do_sample=False)`):

```python
{sample}
```
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parents[1] / "models")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--val-percent", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--warmup", type=float, default=0.05, help="fraction of training")
    p.add_argument("--target-minutes", type=float, default=18.0)
    p.add_argument("--target-steps", type=int, default=None, help="overrides the budget")
    p.add_argument("--target-lr", type=float, default=2.5e-3)
    p.add_argument("--draft-minutes", type=float, default=8.0)
    p.add_argument("--draft-steps", type=int, default=None, help="overrides the budget")
    p.add_argument("--draft-lr", type=float, default=3e-3)
    p.add_argument("--ce-weight", type=float, default=0.1)
    p.add_argument("--eval-seqs", type=int, default=64)
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    out: Path = args.out_dir
    out.mkdir(parents=True, exist_ok=True)

    train_texts, val_texts = load_corpus(args.val_percent)
    tok = train_tokenizer(train_texts, args.vocab_size)
    for text in val_texts:
        assert tok.decode(tok.encode(text).ids) == text, "tokenizer does not round-trip"
    train_ids, val_ids = token_stream(tok, train_texts), token_stream(tok, val_texts)
    log(f"tokens: {len(train_ids):,} train, {len(val_ids):,} val")
    n_chunks = len(val_ids) // args.seq_len
    picks = torch.linspace(0, n_chunks - 1, min(args.eval_seqs, n_chunks)).long().tolist()
    val_seqs = torch.stack([val_ids[i * args.seq_len : (i + 1) * args.seq_len] for i in picks])
    val_batches = list(val_seqs.split(args.batch_size))

    # Target: next-token prediction from scratch.
    target = llama(args.vocab_size, 256, 6, 8, 4, 704, args.max_len)
    log(f"target params: {n_params(target):,}")

    def lm_loss(x: torch.Tensor) -> torch.Tensor:
        return target(input_ids=x, labels=x).loss

    t_steps = train_loop(target, train_ids, args, "target", lm_loss)
    save_model(target, out / TARGET_DIR, tok, args.max_len)
    # Distil from the shipped (bf16-rounded) weights so the draft matches what is served.
    teacher = AutoModelForCausalLM.from_pretrained(out / TARGET_DIR, dtype=torch.float32).eval()

    # Draft: knowledge distillation from the target.
    torch.manual_seed(args.seed + 1)
    draft = llama(args.vocab_size, 128, 2, 4, 2, 352, args.max_len)
    log(f"draft params: {n_params(draft):,}")

    def kd_loss(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t_logp = F.log_softmax(teacher(input_ids=x).logits, dim=-1)
        d_logits = draft(input_ids=x).logits
        d_logp = F.log_softmax(d_logits, dim=-1)
        kl = (t_logp.exp() * (t_logp - d_logp)).sum(-1).mean()
        ce = F.cross_entropy(d_logits[:, :-1].reshape(-1, d_logits.size(-1)), x[:, 1:].reshape(-1))
        return kl + args.ce_weight * ce

    d_steps = train_loop(draft, train_ids, args, "draft", kd_loss)
    save_model(draft, out / DRAFT_DIR, tok, args.max_len)

    # Evaluate the saved artifacts exactly as they load.
    target = AutoModelForCausalLM.from_pretrained(out / TARGET_DIR, dtype=torch.float32).eval()
    draft = AutoModelForCausalLM.from_pretrained(out / DRAFT_DIR, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(out / TARGET_DIR)
    fast_tok = Tokenizer.from_file(str(out / DRAFT_DIR / "tokenizer.json"))
    assert hf_tok.decode(hf_tok(val_texts[0])["input_ids"], skip_special_tokens=True) == val_texts[0]
    assert fast_tok.encode(SAMPLE_PROMPT).ids == hf_tok(SAMPLE_PROMPT)["input_ids"]
    t_loss, d_loss, agreement, tokens = evaluate(target, draft, val_batches)
    prompt = hf_tok(SAMPLE_PROMPT, return_tensors="pt")
    gen = target.generate(**prompt, max_new_tokens=48, do_sample=False, pad_token_id=2)
    sample = hf_tok.decode(gen[0], skip_special_tokens=True)

    rows = []
    for folder, model, steps, loss in ((TARGET_DIR, target, t_steps, t_loss), (DRAFT_DIR, draft, d_steps, d_loss)):
        c, params = model.config, n_params(model)
        mb = (out / folder / "model.safetensors").stat().st_size / 1e6
        rows.append(
            f"| `{folder}` | {c.hidden_size} | {c.num_hidden_layers} | {c.num_attention_heads}/"
            f"{c.num_key_value_heads} | {c.intermediate_size} | {params:,} | {mb:.2f} MB | {steps} "
            f"| {loss:.3f} (ppl {math.exp(loss):.2f}) |"
        )
        log(f"{folder}: {params:,} params, {mb:.2f} MB, held-out loss {loss:.4f}")
    log(f"draft greedy agreement: {agreement:.4f} over {tokens} tokens")
    log(f"sample:\n{sample}")
    counts = {"n_train": len(train_texts), "n_val": len(val_texts), "seqs": len(val_seqs), "tokens": tokens}
    steps = {"t_steps": t_steps, "d_steps": d_steps}
    readme = README.format(a=args, rows="\n".join(rows), agreement=agreement, sample=sample, **counts, **steps)
    (out / "README.md").write_text(readme)
    log(f"wrote {out / 'README.md'}")


if __name__ == "__main__":
    main()
