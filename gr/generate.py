"""Text generation on the KV cache: one prefill over the prompts, then one token per step.

Prompts of different lengths share a batch by left padding (the model masks the padding and counts
positions from each row's first real token, so a row's tokens are the ones it gets alone). A row that
emits a stop token leaves the batch, so the rest decode faster. Sampling draws one uniform number per row
and step from that row's own generator, so a sample depends on its seed, never on its batch mates.
"""

import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from gr.model import KVCache


def sample_next(logits: torch.Tensor, uniforms: torch.Tensor | None, temperature: float, top_p: float, top_k: int) -> torch.Tensor:
    """Next token per row from logits (B, V): greedy when temperature is 0 (or no uniforms), else
    inverse-CDF sampling over the top-k / top-p (nucleus) set of the tempered distribution."""
    if temperature == 0 or uniforms is None:
        return logits.argmax(-1)
    probs, idx = torch.softmax(logits.float() / temperature, dim=-1).sort(dim=-1, descending=True)
    if top_k > 0:
        probs[:, top_k:] = 0
    if top_p < 1.0:
        # Keep the smallest head of the sorted list whose mass reaches top_p (the first token always).
        probs[probs.cumsum(-1) - probs >= top_p] = 0
    cdf = probs.cumsum(-1)
    choice = (cdf < uniforms[:, None].to(cdf.device) * cdf[:, -1:]).sum(-1).clamp(max=probs.shape[1] - 1)
    return idx.gather(1, choice[:, None]).squeeze(1)


@torch.inference_mode()
def generate(
    model,
    prompts: list[list[int]],
    *,
    max_new_tokens: int = 256,
    stop_ids=(),
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    n: int = 1,
    seed: int | list[int] = 0,
    pad_id: int = 0,
    on_token=None,
    done=None,
) -> list[list[int]]:
    """Continue each prompt (a list of token ids); return the new tokens, without the stop token.

    With n > 1 each prompt is continued n times (its prefill is computed once and its cache repeated);
    the result holds len(prompts) * n lists, prompt i's samples at i*n ... i*n + n-1. Prompt i is seeded
    by `seed + i`, or by `seed[i]` when `seed` is a list (so callers can make a prompt's samples
    independent of its batch). `on_token(row, token_id)` is called for every new token as it is made;
    `done(row, tokens)` may end a row early (a guard stops at the end of its Answers block).
    """
    device = next(model.parameters()).device
    B, L = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    mask = torch.zeros(B, L, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):] = torch.tensor(p)
        mask[i, L - len(p):] = True
    cache = KVCache(model.config, B, L + max_new_tokens, next(model.parameters()).dtype, device)
    logits = model(ids.to(device), attention_mask=mask.to(device), cache=cache, last_only=True)[:, -1]
    if n > 1:
        rows = torch.arange(B, device=device).repeat_interleave(n)
        cache.select(rows)
        logits = logits[rows]
    gens = None
    if temperature > 0:
        seeds = seed if isinstance(seed, list) else [seed + i for i in range(B)]
        gens = [torch.Generator().manual_seed(seeds[r // n] * 1_000_003 + r % n) for r in range(B * n)]
    stops = set(stop_ids)
    out = [[] for _ in range(B * n)]
    active = list(range(B * n))  # output row of each batch row still decoding
    for step in range(max_new_tokens):
        uniforms = torch.cat([torch.rand(1, generator=gens[r]) for r in active]) if gens else None
        tokens = sample_next(logits, uniforms, temperature, top_p, top_k).tolist()
        keep = []
        for j, (r, t) in enumerate(zip(active, tokens)):
            if t in stops:
                continue
            out[r].append(t)
            if on_token is not None:
                on_token(r, t)
            if done is None or not done(r, out[r]):
                keep.append(j)
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(active):
            cache.select(torch.tensor(keep, device=device))
            active = [active[j] for j in keep]
            tokens = [tokens[j] for j in keep]
        logits = model(torch.tensor(tokens, device=device)[:, None], cache=cache)[:, -1]
    return out


@dataclass
class Completion:
    text: str
    tokens: list[int]
    prompt_tokens: int
    seconds: float  # its batch's generation time, shared equally among the batch's outputs


def complete(
    model,
    tokenizer,
    prompts: list[str],
    *,
    batch_size: int = 8,
    n: int = 1,
    max_new_tokens: int = 2048,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    seeds: list[int] | None = None,
    progress: bool | str = False,
    on_token=None,
    done=None,
) -> list[list[Completion]]:
    """Generate for many prompt texts (BOS added as the tokenizer does): a list of n Completions each.

    Prompts are batched in order of length, which wastes the least compute on padding; the results
    come back in input order. Prompt i is seeded by `seeds[i]` (default `seed + i`) whatever its batch,
    so its samples do not depend on the batch size or on which prompts share its batch.
    `on_token(i, token_id)` is called for each new token of prompt i (with n = 1) as it is made, and
    `done(tokens)` may end an output early.
    """
    encoded = [tokenizer.encode(p, bos=True) for p in prompts]
    seeds = seeds if seeds is not None else [seed + i for i in range(len(prompts))]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    results: list[list[Completion]] = [[] for _ in prompts]
    desc = progress if isinstance(progress, str) else "generating"
    started, new_tokens = time.perf_counter(), 0
    with tqdm(total=len(prompts), desc=desc, disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            began = time.perf_counter()
            outs = generate(
                model, [encoded[i] for i in chunk], max_new_tokens=max_new_tokens, stop_ids=tokenizer.stop_ids,
                temperature=temperature, top_p=top_p, top_k=top_k, n=n, seed=[seeds[i] for i in chunk],
                pad_id=tokenizer.pad_id,
                on_token=None if on_token is None else lambda row, token, chunk=chunk: on_token(chunk[row], token),
                done=None if done is None else lambda row, tokens: done(tokens),
            )
            share = (time.perf_counter() - began) / len(outs)
            for k, i in enumerate(chunk):
                results[i] = [Completion(tokenizer.decode(o), o, len(encoded[i]), share) for o in outs[k * n:(k + 1) * n]]
            new_tokens += sum(len(o) for o in outs)
            bar.set_postfix(tok_s=f"{new_tokens / (time.perf_counter() - started):.0f}", refresh=False)
            bar.update(len(chunk))
    return results
