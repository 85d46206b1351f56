"""The base model: a LLaMA decoder written out in plain PyTorch (GuardReasoner fine-tunes Llama 3.x).

token ids -> embed_tokens -> N x [x + attn(norm(x)); x + mlp(norm(x))] -> norm -> lm_head -> logits

Module and parameter names equal the Hugging Face checkpoint names (`model.layers.3.self_attn.q_proj.weight`
...), so a checkpoint is a plain state-dict load and what we save loads in transformers and vLLM (reading and
writing checkpoints is gr.checkpoint's job). Numerics follow transformers' LlamaForCausalLM: RMSNorm in
float32, rotary embeddings on the two halves of each head ("rotate_half"), cos/sin computed in float32 then
cast, SDPA attention with grouped-query heads.
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # e.g. {"rope_type": "llama3", "factor": 32.0, ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    pad_token_id: int | None = None

    def __post_init__(self):
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")


def rope_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/d) of the rotary embedding, with linear or llama3 scaling.

    llama3 scaling (Llama 3.1+) stretches long wavelengths by `factor`, keeps short ones, and blends the
    band between smoothly, so the model reaches 128k positions without changing its short-range behaviour.
    """
    d = cfg.head_dim
    # Built on the CPU even while the model is being built on the "meta" device for loading.
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device="cpu").float() / d))
    scaling = cfg.rope_scaling or {}
    if scaling.get("rope_type") == "linear":
        return inv_freq / scaling["factor"]
    if scaling.get("rope_type") == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, blended, scaled)
    return inv_freq


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (x_i, x_{i+d/2}) pair of every head by its position's angle. x: (B, H, T, D)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def causal_mask(keys: torch.Tensor, start: int, T: int, padded: bool) -> torch.Tensor | None:
    """Which keys each of T queries (at positions start..start+T-1) may see: (B, 1, T, S) bool, or None.

    keys (B, S) marks the real (not left-padding) keys among all S = start + T. None leaves the causal rule
    to SDPA, which is exact and fastest when nothing is padded and either the queries start at key 0 (a
    first forward: `is_causal` aligns query i with key i) or there is one query (a decode step: it sees
    every key). Queries that continue a cache (start > 0, T > 1) need the mask: SDPA's `is_causal` aligns
    them with the first keys, not with their own positions.
    """
    if not padded and (start == 0 or T == 1):
        return None
    q = torch.arange(start, start + T, device=keys.device)[:, None]
    k = torch.arange(start + T, device=keys.device)[None, :]
    # A padding query sees itself, so that its row is not all masked (that would give NaN).
    return ((keys[:, None, :] | (k == q)) & (k <= q))[:, None]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Computed in float32: in bf16 the mean of squares loses the precision the scale needs.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class KVCache:
    """Keys and values of every layer for a batch, preallocated to `max_len` positions.

    `length` columns are filled; `real` marks which of them are real tokens (left padding is not);
    `next_pos` is each row's rotary position for its next token, so a padded row counts from 0 as it
    would alone; `padded` says whether any padding was ever cached (attention then needs a mask).
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, device):
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.real = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.length = 0
        self.padded = False

    def add_tokens(self, real: torch.Tensor) -> torch.Tensor:
        """Record T new tokens (real: (B, T) bool) and return their rotary positions (B, T)."""
        T = real.shape[1]
        self.real[:, self.length:self.length + T] = real
        pos = real.long().cumsum(1) - 1 + self.next_pos[:, None]
        self.next_pos += real.sum(1)
        self.padded |= not bool(real.all())
        return pos

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one layer's new keys and values (B, H, T, D); return all keys and values to attend to."""
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        if not self.length:  # a first forward: the new keys are all the keys, attend to them, not to a copy
            return k, v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def truncate(self, length: int) -> None:
        """Forget every position from `length` on (to score another continuation of the same prefix)."""
        self.next_pos -= self.real[:, length:self.length].sum(1)
        self.real[:, length:self.length] = False
        self.length = length

    def copy(self, max_len: int) -> "KVCache":
        """A new cache holding this one's filled positions, with room for `max_len` (a shared prefix,
        computed once, starts many sequences)."""
        new = KVCache.__new__(KVCache)
        B, H, _, D = self.k[0].shape
        new.k = [k.new_zeros(B, H, max_len, D) for k in self.k]
        new.v = [v.new_zeros(B, H, max_len, D) for v in self.v]
        for mine, theirs in zip(new.k + new.v, self.k + self.v):
            mine[:, :, :self.length] = theirs[:, :, :self.length]
        new.real = self.real.new_zeros(B, max_len)
        new.real[:, :self.length] = self.real[:, :self.length]
        new.next_pos, new.length, new.padded = self.next_pos.clone(), self.length, self.padded
        return new

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows (in this order): drops finished rows, or repeats rows for n samples."""
        self.k = [k.index_select(0, rows) for k in self.k]
        self.v = [v.index_select(0, rows) for v in self.v]
        self.real = self.real.index_select(0, rows)
        self.next_pos = self.next_pos.index_select(0, rows)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.n_heads, self.n_kv, self.head_dim = layer, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=cfg.attention_bias)

    def forward(self, x, cos, sin, mask, cache: KVCache | None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        # Grouped-query attention: each key/value head serves n_heads / n_kv query heads.
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, enable_gqa=self.n_kv != self.n_heads
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """The decoder stack without the output head (HF's `model.` prefix)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        # A plain attribute, not a buffer: `model.to(bfloat16)` must not round the frequencies.
        self.inv_freq = rope_frequencies(cfg)
        self.gradient_checkpointing = False

    def tie_weights(self) -> None:
        """With tied embeddings the output head is the embedding matrix itself (after any load, too)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def init_weights(self, seed: int = 0, std: float = 0.02) -> None:
        """Random initialization for training from scratch (normal(0, std) weights, unit norms)."""
        gen = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("layernorm.weight") or name == "model.norm.weight":
                    p.fill_(1.0)
                elif name.endswith(".bias"):
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * std)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
        logits_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, vocab); (B, 1, vocab) with `last_only`; with `logits_at`, a
        (B, T) bool mask, only the logits at those positions, as (N, vocab) in row-major order (training
        needs them at output tokens only, and the vocabulary projection is the largest activation).

        attention_mask (B, T) marks real tokens (1) and left padding (0); without it every token is real
        and attention is plainly causal, which is also right for right-padded training batches (a real
        token never looks at the padding after it). With `cache`, the tokens continue the cached ones.
        """
        B, T = input_ids.shape
        real = torch.ones(B, T, dtype=torch.bool, device=input_ids.device) if attention_mask is None else attention_mask.bool()
        if cache is None:
            # Rotary position of each token: count real tokens only, so left padding does not shift a row.
            pos, start, keys, padded = real.long().cumsum(1) - 1, 0, real, not bool(real.all())
        else:
            start = cache.length
            pos = cache.add_tokens(real)
            keys, padded = cache.real[:, :start + T], cache.padded
        mask = causal_mask(keys, start, T, padded)
        self.inv_freq = self.inv_freq.to(input_ids.device)
        freqs = pos.clamp(min=0)[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        h = self.model.embed_tokens(input_ids)
        cos, sin = emb.cos().to(h.dtype)[:, None], emb.sin().to(h.dtype)[:, None]
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training:
                h = checkpoint(layer, h, cos, sin, mask, use_reentrant=False)
            else:
                h = layer(h, cos, sin, mask, cache)
        if cache is not None:
            cache.length += T
        if last_only:
            h = h[:, -1:]
        elif logits_at is not None:
            h = h[logits_at]
        return self.lm_head(self.model.norm(h))
