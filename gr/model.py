"""The base model: a LLaMA decoder written out in plain PyTorch (GuardReasoner fine-tunes Llama 3.x).

token ids -> embed_tokens -> N x [x + attn(norm(x)); x + mlp(norm(x))] -> norm -> lm_head -> logits

Module and parameter names equal the Hugging Face checkpoint names (`model.layers.3.self_attn.q_proj.weight`
...), so a checkpoint is a plain state-dict load and what we save loads in transformers and vLLM.
Numerics follow transformers' LlamaForCausalLM: RMSNorm in float32, rotary embeddings on the two halves
of each head ("rotate_half"), cos/sin computed in float32 then cast, SDPA attention with GQA.
"""

import math
from dataclasses import dataclass, field, fields

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

    @classmethod
    def from_hf(cls, hf: dict) -> "ModelConfig":
        """Read a Hugging Face LLaMA config.json in either of its two forms.

        Older files carry `rope_theta` + `rope_scaling` (whose kind is `rope_type`, or `type` in some);
        files written by transformers 5 carry one `rope_parameters` dict holding all of it.
        """
        known = {f.name for f in fields(cls)} - {"rope_theta", "rope_scaling", "eos_token_id", "head_dim"}
        kw = {k: v for k, v in hf.items() if k in known}
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", None) or hf.get("rope_theta") or 10000.0
        kind = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
        if kind not in ("default", "llama3", "linear"):
            raise ValueError(f"rope type '{kind}' is not supported (default, linear and llama3 are)")
        eos = hf.get("eos_token_id")
        return cls(
            **kw,
            head_dim=hf.get("head_dim") or 0,
            rope_theta=float(theta),
            rope_scaling=None if kind == "default" else {"rope_type": kind, **rope},
            eos_token_id=[] if eos is None else [eos] if isinstance(eos, int) else list(eos),
        )

    def to_hf(self, dtype: torch.dtype = torch.float32) -> dict:
        """A config.json in the `rope_theta` + `rope_scaling` form, which every LLaMA loader reads."""
        hf = {f.name: getattr(self, f.name) for f in fields(self)}
        hf["eos_token_id"] = self.eos_token_id[0] if len(self.eos_token_id) == 1 else self.eos_token_id
        hf.update(
            architectures=["LlamaForCausalLM"],
            model_type="llama",
            hidden_act="silu",
            torch_dtype=str(dtype).removeprefix("torch."),
        )
        return hf


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

    `length` columns are filled; `valid` marks which of them are real tokens (left padding is not);
    `next_pos` is each row's rotary position for its next token, so a padded row counts from 0 like it
    would alone.
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, device):
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.length = 0
        self.padded = False  # any padding cached: attention then needs an explicit mask

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows (in this order): drops finished rows, or repeats rows for n samples."""
        self.k = [k.index_select(0, rows) for k in self.k]
        self.v = [v.index_select(0, rows) for v in self.v]
        self.valid = self.valid.index_select(0, rows)
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
            end = cache.length + T
            cache.k[self.layer][:, :, cache.length:end] = k
            cache.v[self.layer][:, :, cache.length:end] = v
            if cache.length:  # else the new keys are all the keys: attend to them, not to a copy
                k, v = cache.k[self.layer][:, :, :end], cache.v[self.layer][:, :, :end]
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
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # A plain attribute, not a buffer: `model.to(bfloat16)` must not round the frequencies.
        self.inv_freq = rope_frequencies(cfg)
        self.gradient_checkpointing = False

    @classmethod
    def from_pretrained(cls, path_or_id, dtype: torch.dtype = torch.float32, device="cpu") -> "Transformer":
        """Load a Hugging Face LLaMA checkpoint (a local folder or a hub id) into `dtype` on `device`."""
        from gr.checkpoint import load_model

        return load_model(cls, path_or_id, dtype=dtype, device=device)

    def save_pretrained(self, out_dir, tokenizer_dir=None, max_shard_bytes: int = 2 * 1024**3) -> None:
        """Write a Hugging Face folder (config, safetensors, tokenizer files) atomically."""
        from gr.checkpoint import save_model

        save_model(self, out_dir, tokenizer_dir=tokenizer_dir, max_shard_bytes=max_shard_bytes)

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
        dev = input_ids.device
        real = torch.ones(B, T, dtype=torch.bool, device=dev) if attention_mask is None else attention_mask.bool()
        # Rotary position of each token: count real tokens only, so left padding does not shift a row.
        pos = real.long().cumsum(1) - 1
        start = 0
        if cache is not None:
            start = cache.length
            pos = pos + cache.next_pos[:, None]
            cache.valid[:, start:start + T] = real
            cache.next_pos += real.sum(1)
        # Without padding, SDPA's own causal rule is exact and fastest: no mask to build or apply.
        padded = attention_mask is not None and not bool(real.all())
        if cache is not None:
            cache.padded |= padded
            padded = cache.padded or (start > 0 and T > 1)
        mask = None
        if padded:
            keys = cache.valid[:, :start + T] if cache is not None else real
            q_idx = torch.arange(start, start + T, device=dev)[:, None]
            k_idx = torch.arange(start + T, device=dev)[None, :]
            # A padding query sees only itself, so its row is finite (an all-masked row would give NaN).
            mask = ((keys[:, None, :] | (k_idx == q_idx)) & (k_idx <= q_idx))[:, None]
        self.inv_freq = self.inv_freq.to(dev)
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
