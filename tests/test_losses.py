"""The loss math of R-SFT (section 4) and HS-DPO (section 6), on numbers small enough to check by hand."""

import math

import pytest
import torch
import torch.nn.functional as F

from gr.data import IGNORE, Example
from gr.losses import dpo_loss, output_positions, sequence_logps, sft_loss


def tiny_batch():
    """Two sequences over a 3-token vocabulary; logits chosen so the softmaxes are easy to write down."""
    logits = torch.tensor([
        [[0.0, 0.0, 0.0], [math.log(2), 0.0, 0.0], [0.0, math.log(3), 0.0], [5.0, 5.0, 5.0]],
        [[0.0, 0.0, math.log(6)], [1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]],
    ])
    # Row 0: prompt = first token; outputs at t = 1, 2, 3. Row 1: prompt = 2 tokens, one output, one pad.
    labels = torch.tensor([[IGNORE, 0, 1, 2], [IGNORE, IGNORE, 2, IGNORE]])
    return logits, labels


def test_sft_loss_by_hand():
    logits, labels = tiny_batch()
    # Position t predicts label t+1:
    # row 0: p(0 | uniform) = 1/3; p(1 | [2,1,1]/4) = 1/4; p(2 | [1,3,1]/5) = 1/5
    # row 1: p(2 | [e^1, e^2, e^3] / sum) at t=1
    p_row1 = math.exp(3) / (math.exp(1) + math.exp(2) + math.exp(3))
    expected = -(math.log(1 / 3) + math.log(1 / 4) + math.log(1 / 5) + math.log(p_row1)) / 4
    assert sft_loss(logits, labels).item() == pytest.approx(expected, abs=1e-6)
    # As part of a step with 8 output tokens in all, this batch's share is its sum over 8.
    assert sft_loss(logits, labels, num_tokens=8).item() == pytest.approx(expected * 4 / 8, abs=1e-6)


def test_sft_loss_equals_cross_entropy_with_ignore_index():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 9, 11, generator=g)
    labels = torch.randint(0, 11, (3, 9), generator=g)
    labels[:, :4] = IGNORE
    labels[2, 7:] = IGNORE
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert sft_loss(logits, labels).item() == pytest.approx(ref.item(), abs=1e-6)


def test_parts_of_a_step_add_up_to_the_whole_batch():
    """Gradient accumulation: each micro-batch divided by the step's token count sums to the full mean."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 7, 5, generator=g)
    labels = torch.randint(0, 5, (4, 7), generator=g)
    labels[:, :2] = IGNORE
    labels[1, 4:] = IGNORE
    total = int((labels[:, 1:] != IGNORE).sum())
    parts = sft_loss(logits[:2], labels[:2], num_tokens=total) + sft_loss(logits[2:], labels[2:], num_tokens=total)
    assert parts.item() == pytest.approx(sft_loss(logits, labels).item(), abs=1e-6)


def test_sft_loss_unchanged_by_extra_padding():
    logits, labels = tiny_batch()
    padded_logits = torch.cat([logits, torch.randn(2, 5, 3)], dim=1)
    padded_labels = torch.cat([labels, torch.full((2, 5), IGNORE)], dim=1)
    assert sft_loss(padded_logits, padded_labels).item() == pytest.approx(sft_loss(logits, labels).item(), abs=1e-7)


def test_prompt_tokens_get_no_gradient():
    logits, labels = tiny_batch()
    logits.requires_grad_(True)
    sft_loss(logits, labels).backward()
    # Positions whose next label is ignored (row 0 t=3; row 1 t=0, 2, 3) get exactly zero gradient.
    assert torch.all(logits.grad[0, 3] == 0) and torch.all(logits.grad[1, [0, 2, 3]] == 0)
    assert torch.all(logits.grad[0, :3].abs().sum(-1) > 0) and logits.grad[1, 1].abs().sum() > 0


def test_sequence_logps_ignore_prompt_and_padding():
    logits, labels = tiny_batch()
    logps, lengths = sequence_logps(logits, labels)
    p_row1 = math.exp(3) / (math.exp(1) + math.exp(2) + math.exp(3))
    assert logps.tolist() == pytest.approx([math.log(1 / 60), math.log(p_row1)], abs=1e-6)
    assert lengths.tolist() == [3.0, 1.0]
    # Changing the logits at prompt and padding positions changes nothing.
    other = logits.clone()
    other[1, 0] = torch.tensor([9.0, -9.0, 0.0])
    other[1, 3] = torch.tensor([1.0, 7.0, 3.0])
    assert torch.equal(sequence_logps(other, labels)[0], logps)


PC, PR = torch.tensor([-10.0, -20.0]), torch.tensor([-12.0, -15.0])
RC, RR = torch.tensor([-11.0, -18.0]), torch.tensor([-11.0, -16.0])


def test_dpo_by_hand():
    beta = 0.5
    terms = dpo_loss(PC, PR, RC, RR, beta=beta)
    # pair 0: r_w = 0.5*(-10+11) = 0.5, r_l = 0.5*(-12+11) = -0.5, margin 1.0
    # pair 1: r_w = 0.5*(-20+18) = -1.0, r_l = 0.5*(-15+16) = 0.5, margin -1.5
    expected = [-math.log(1 / (1 + math.exp(-1.0))), -math.log(1 / (1 + math.exp(1.5)))]
    assert terms.loss.tolist() == pytest.approx(expected, abs=1e-6)
    assert terms.preference.tolist() == pytest.approx(expected, abs=1e-6)
    assert terms.chosen_rewards.tolist() == pytest.approx([0.5, -1.0])
    assert terms.rejected_rewards.tolist() == pytest.approx([-0.5, 0.5])
    assert terms.margin.tolist() == pytest.approx([1.0, -1.5])
    assert terms.sft.tolist() == [0.0, 0.0]


def test_dpo_textbook_formula_with_unit_weights_and_no_ftx():
    beta = 0.1
    textbook = -F.logsigmoid(beta * ((PC - RC) - (PR - RR)))
    assert torch.allclose(dpo_loss(PC, PR, RC, RR, beta=beta).loss, textbook, atol=1e-7)
    assert torch.allclose(dpo_loss(PC, PR, RC, RR, beta=beta, weights=torch.ones(2)).loss, textbook, atol=1e-7)


def test_weight_scales_the_preference_term_exactly():
    beta, w = 0.1, torch.tensor([0.8, 1.2])
    per_pair = -F.logsigmoid(beta * ((PC - RC) - (PR - RR)))
    assert torch.allclose(dpo_loss(PC, PR, RC, RR, beta=beta, weights=w).loss, w * per_pair, atol=1e-7)
    lengths = torch.tensor([4.0, 5.0])
    with_sft = dpo_loss(PC, PR, RC, RR, beta=beta, weights=w, ftx=2.0, chosen_lengths=lengths)
    # The weight does not touch the SFT term.
    assert torch.allclose(with_sft.loss, w * per_pair + 2.0 * -PC / lengths, atol=1e-6)
    assert torch.allclose(with_sft.preference, per_pair, atol=1e-7)


def test_sft_term_is_length_normalized_chosen_nll():
    lengths = torch.tensor([4.0, 5.0])
    plain = dpo_loss(PC, PR, RC, RR, beta=0.1)
    with_sft = dpo_loss(PC, PR, RC, RR, beta=0.1, ftx=2.0, chosen_lengths=lengths)
    assert with_sft.sft.tolist() == pytest.approx([10 / 4, 20 / 5])
    assert (with_sft.loss - plain.loss).tolist() == pytest.approx([2.0 * 10 / 4, 2.0 * 20 / 5], abs=1e-6)
    with pytest.raises(ValueError):
        dpo_loss(PC, PR, RC, RR, ftx=1.0)


def test_swapping_chosen_and_rejected_flips_the_margin():
    a = dpo_loss(PC, PR, RC, RR, beta=0.3)
    b = dpo_loss(PR, PC, RR, RC, beta=0.3)
    assert torch.allclose(b.margin, -a.margin)
    assert torch.allclose(b.chosen_rewards, a.rejected_rewards)


def test_gradients_raise_chosen_and_lower_rejected():
    pc, pr = PC.clone().requires_grad_(True), PR.clone().requires_grad_(True)
    terms = dpo_loss(pc, pr, RC, RR, beta=0.1, weights=torch.tensor([0.8, 1.2]), ftx=2.0, chosen_lengths=torch.tensor([4.0, 5.0]))
    terms.loss.mean().backward()
    assert torch.all(pc.grad < 0)  # descending the loss raises log pi(chosen)
    assert torch.all(pr.grad > 0)  # and lowers log pi(rejected)


def test_dpo_task_metrics_are_means_over_the_step_whatever_the_micro_batches():
    """DPOTask divides each pair's loss and metrics by the step's pair count: micro-batches add up to the
    step's means, which are those of dpo_loss over all pairs at once."""
    from gr.hsdpo import DPOTask

    class Fixed(DPOTask):
        def _logps(self, model, indices):
            return PC[indices], PR[indices], torch.tensor([4.0, 5.0])[indices]

    one = Example([0, 1], [IGNORE, 1])
    task = Fixed([{"chosen": one, "rejected": one, "weight": w} for w in (0.8, 1.2)], pad_id=0, beta=0.1, ftx=2.0)
    task.ref = torch.stack([RC, RR], 1)
    whole = dpo_loss(PC, PR, RC, RR, beta=0.1, weights=torch.tensor([0.8, 1.2]), ftx=2.0, chosen_lengths=torch.tensor([4.0, 5.0]))
    parts = [task.loss(None, [i], total=2) for i in (0, 1)]
    assert sum(p[0] for p in parts).item() == pytest.approx(whole.loss.mean().item(), abs=1e-6)
    assert sum(p[1]["rewards/margin"] for p in parts).item() == pytest.approx(whole.margin.mean().item(), abs=1e-6)
    assert sum(p[1]["rewards/accuracy"] for p in parts).item() == 0.5


def test_logits_at_output_positions_only_give_the_same_losses():
    """The model can skip the vocabulary projection of prompt and padding: same loss, same log-probs."""
    from gr.model import ModelConfig, Transformer

    model = Transformer(ModelConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2))
    model.init_weights(seed=0)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 40, (3, 9), generator=g)
    labels = ids.clone()
    labels[:, :4] = IGNORE
    labels[0, 7:] = IGNORE
    mask = output_positions(labels)
    assert mask.sum().item() == int((labels[:, 1:] != IGNORE).sum())
    full, some = model(ids), model(ids, logits_at=mask)
    assert some.shape == (mask.sum().item(), 40) and torch.allclose(full[mask], some, atol=1e-6)
    assert sft_loss(some, labels).item() == pytest.approx(sft_loss(full, labels).item(), abs=1e-6)
    assert torch.allclose(sequence_logps(some, labels)[0], sequence_logps(full, labels)[0], atol=1e-5)
