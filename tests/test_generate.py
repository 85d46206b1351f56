"""Generation on the KV cache against transformers' generate, and the batching and sampling rules."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import hf_tiny
from gr.checkpoint import load_model
from gr.generate import generate, sample_next
from gr.model import Transformer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = hf_tiny(tmp_path_factory.mktemp("gen"), head_dim=24)
    return folder, load_model(folder)


PROMPTS = [[5, 17, 99, 3, 250, 8], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [42], [7, 7, 7, 7]]


def test_greedy_equals_transformers_generate(tiny):
    folder, model = tiny
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for prompt in PROMPTS[:2]:
        want = ref.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False, eos_token_id=None,
                            pad_token_id=0)[0, len(prompt):].tolist()
        assert len(want) == 40 and generate(model, [prompt], max_new_tokens=40) == [want]


def test_batch_rows_equal_each_prompt_alone(tiny):
    _, model = tiny
    batch = generate(model, PROMPTS, max_new_tokens=32)
    assert batch == [generate(model, [p], max_new_tokens=32)[0] for p in PROMPTS]


def test_each_row_stops_on_its_own(tiny):
    _, model = tiny
    free = generate(model, PROMPTS, max_new_tokens=20)
    stop = free[0][4]  # a token that row 0 emits at step 5
    stopped = generate(model, PROMPTS, max_new_tokens=20, stop_ids=[stop])
    for full, cut in zip(free, stopped):
        expected = full[:full.index(stop)] if stop in full else full
        assert cut == expected
    assert len(stopped[0]) == 4


def test_sampling_is_seeded_and_independent_of_batch_mates(tiny):
    _, model = tiny
    kw = dict(max_new_tokens=16, temperature=0.7, top_p=0.95, n=3)
    a = generate(model, PROMPTS, seed=[10, 11, 12, 13], **kw)
    b = generate(model, PROMPTS, seed=[10, 11, 12, 13], **kw)
    assert a == b and len(a) == 12
    assert len({tuple(x) for x in a[:3]}) > 1  # the n samples of a prompt differ
    alone = generate(model, [PROMPTS[2]], seed=[12], **kw)
    assert alone == a[6:9]
    assert generate(model, PROMPTS, seed=[99, 11, 12, 13], **kw)[:3] != a[:3]


def test_streaming_callback_sees_every_token(tiny):
    _, model = tiny
    seen = {}
    out = generate(model, PROMPTS, max_new_tokens=10, on_token=lambda r, t: seen.setdefault(r, []).append(t))
    assert [seen[r] for r in range(len(PROMPTS))] == out


def test_sample_next_rules():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    u = lambda x: torch.tensor([x])  # noqa: E731
    assert sample_next(logits, None, 1.0, 1.0, 0).item() == 0  # no randomness: greedy
    # Inverse CDF over (0.5, 0.3, 0.15, 0.05): u=0.6 falls in the second token's mass.
    assert sample_next(logits, u(0.6), 1.0, 1.0, 0).item() == 1
    assert sample_next(logits, u(0.9), 1.0, 1.0, 0).item() == 2
    # top-p 0.75 keeps {0.5, 0.3} (mass 0.8): u=0.9 of that mass is token 1, never token 2.
    assert sample_next(logits, u(0.9), 1.0, 0.75, 0).item() == 1
    # top-k 1 is greedy whatever u is.
    assert sample_next(logits, u(0.99), 1.0, 1.0, 1).item() == 0
