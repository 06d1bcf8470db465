"""The Llama decoder (Touvron et al. 2023) and its close relatives Mistral and Qwen2.

    h = x + Attn(RMSNorm(x));  out = h + MLP(RMSNorm(h));  MLP(x) = W_down (SiLU(W_gate x) * W_up x)

Attention is grouped-query (Ainslie et al. 2023) with rotary positions. Qwen2 adds a bias to q/k/v.
Linear layers are column/row parallel over ``tp``; embeddings and the LM head are replicated.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from parallel.distributed import TPGroup
from parallel.layers.attention import AttentionMetadata, PagedAttention
from parallel.layers.embedding import Embedding
from parallel.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from parallel.layers.norm import RMSNorm
from parallel.layers.rotary import RotaryEmbedding, rotate

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


@dataclass(frozen=True)
class LlamaArgs:
    """The architecture hyper-parameters read from a Hugging Face ``config.json``."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    sliding_window: int | None

    @property
    def num_parameters(self) -> int:
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        attn = h * self.num_heads * self.head_dim * 2 + h * kv * 2
        layer = attn + 3 * h * self.intermediate_size + 2 * h
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + embed + h

    def check_tensor_parallel(self, tp: int) -> None:
        """Shapes must split evenly over ``tp`` ranks; the message gives the numbers."""
        problems = [f"{name}={value}" for name, value in (
            ("num_attention_heads", self.num_heads), ("intermediate_size", self.intermediate_size)) if value % tp]
        if self.num_kv_heads % tp and tp % self.num_kv_heads:
            problems.append(f"num_key_value_heads={self.num_kv_heads} (must divide, or be a multiple of, it)")
        if problems:
            raise ValueError(f"tensor_parallel_size={tp} does not divide {', '.join(problems)}")

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> LlamaArgs:
        archs = cfg.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ValueError(f"unsupported architecture {archs!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {cfg['hidden_act']!r} (only silu)")
        heads = cfg["num_attention_heads"]
        # transformers >= 5 stores rope settings in rope_parameters; older configs use rope_theta/rope_scaling.
        rope = dict(cfg.get("rope_parameters") or {})
        theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
        scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        qwen = arch == "Qwen2ForCausalLM"
        window = cfg.get("sliding_window") if (not qwen or cfg.get("use_sliding_window")) else None
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=qwen or bool(cfg.get("attention_bias", False)),
            o_bias=not qwen and bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            sliding_window=window,
        )


class LlamaAttention(nn.Module):
    def __init__(self, a: LlamaArgs, tp: TPGroup) -> None:
        super().__init__()
        self.qkv_proj = QKVParallelLinear(a.hidden_size, a.head_dim, a.num_heads, a.num_kv_heads, a.qkv_bias, tp)
        self.o_proj = RowParallelLinear(a.num_heads * a.head_dim, a.hidden_size, a.o_bias, tp)
        self.attn = PagedAttention(self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, a.head_dim)

    def forward(self, rope: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor, meta: AttentionMetadata
                ) -> torch.Tensor:
        t, h, h_kv = x.shape[0], self.attn.num_heads, self.attn.num_kv_heads
        heads = self.qkv_proj(x).view(t, h + 2 * h_kv, self.attn.head_dim)  # [q heads | k heads | v heads]
        qk = rotate(heads[:, :h + h_kv], rope)  # q and k rotated together: one set of ops, not two
        o = self.attn(qk[:, :h], qk[:, h:], heads[:, h + h_kv:], meta)
        return self.o_proj(o.reshape(t, -1))


class LlamaMLP(nn.Module):
    def __init__(self, a: LlamaArgs, tp: TPGroup) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(a.hidden_size, [a.intermediate_size] * 2, a.mlp_bias, tp)
        self.down_proj = RowParallelLinear(a.intermediate_size, a.hidden_size, a.mlp_bias, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, a: LlamaArgs, tp: TPGroup) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.self_attn = LlamaAttention(a, tp)
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.mlp = LlamaMLP(a, tp)

    def forward(self, rope: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor, meta: AttentionMetadata
                ) -> torch.Tensor:
        h = x + self.self_attn(rope, self.input_layernorm(x), meta)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaForCausalLM(nn.Module):
    """Llama / Mistral / Qwen2 causal LM over a flat batch of tokens from many requests.

    Example:
        >>> model = LlamaForCausalLM(args, TPGroup.single())  # args = LlamaArgs.from_hf(config_json)
        >>> model.load_weights(iter_safetensors(folder))
    """

    # checkpoint name fragment -> (our parameter fragment, shard id)
    STACKED = (
        (".q_proj.", ".qkv_proj.", "q"), (".k_proj.", ".qkv_proj.", "k"), (".v_proj.", ".qkv_proj.", "v"),
        (".gate_proj.", ".gate_up_proj.", 0), (".up_proj.", ".gate_up_proj.", 1),
    )

    def __init__(self, args: LlamaArgs, tp: TPGroup) -> None:
        super().__init__()
        self.args = args
        self.embed_tokens = Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(args, tp) for _ in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        # one rotary table for all layers: cos/sin are gathered once per forward, not once per layer
        self.rotary = RotaryEmbedding(args.head_dim, args.max_position_embeddings, args.rope_theta, args.rope_scaling)
        self.lm_head = self.embed_tokens if args.tie_word_embeddings else Embedding(args.vocab_size, args.hidden_size)

    def attention_layers(self) -> list[PagedAttention]:
        return [layer.self_attn.attn for layer in self.layers]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """[T] token ids at [T] positions -> [T, hidden] final hidden states."""
        x = self.embed_tokens(input_ids)
        rope = self.rotary.cos_sin(positions, x.dtype)
        for layer in self.layers:
            x = layer(rope, x, meta)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.logits(hidden)

    def _our_name(self, name: str) -> str:
        name = name.removeprefix("model.")
        return "lm_head.weight" if name == "lm_head.weight" else name

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy a checkpoint's tensors into this rank's parameters; every parameter must be found."""
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb" in name:
                continue
            if name == "lm_head.weight" and self.args.tie_word_embeddings:
                continue
            name = self._our_name(name)
            for ckpt, ours, shard in self.STACKED:
                if ckpt in name:
                    target = name.replace(ckpt, ours)
                    param = params[target]
                    param.weight_loader(param, tensor.to(param.dtype), shard)
                    loaded.add(target)
                    break
            else:
                if name not in params:
                    raise ValueError(f"unexpected weight {name!r} in checkpoint")
                param = params[name]
                loader = getattr(param, "weight_loader", None)
                if loader is None:
                    param.data.copy_(tensor.to(param.dtype))
                else:
                    loader(param, tensor.to(param.dtype))
                loaded.add(name)
        if self.args.tie_word_embeddings:
            loaded.add("lm_head.weight")
        missing = sorted(set(params) - loaded)
        if missing:
            raise ValueError(f"checkpoint is missing weights: {', '.join(missing[:8])}"
                             + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else ""))
