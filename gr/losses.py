"""The two training objectives: R-SFT's token NLL (paper section 4) and HS-DPO's weighted DPO (section 6).

Shapes: B sequences of T tokens over a vocabulary of V. `labels` (B, T) hold the token ids to learn and
-100 (IGNORE) on the prompt and on padding; logits at position t predict the label at t + 1.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F

from gr.data import IGNORE


def output_positions(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: the positions t whose next token labels[:, t+1] is learned (not IGNORE)."""
    return F.pad(labels[:, 1:] != IGNORE, (0, 1), value=False)


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(label_{t+1} | tokens <= t) at every output position, and the (B, T) mask of those positions.

    logits: (B, T, V) at every position, or (N, V) at the N output positions only, in row-major order
    (what `model(ids, logits_at=output_positions(labels))` returns: it skips the vocabulary projection of
    prompt and padding tokens). labels (B, T) -> logps (N,) float32, mask (B, T) bool.
    """
    mask = output_positions(labels)
    targets = labels[:, 1:][mask[:, :-1]]
    if logits.dim() == 3:
        logits = logits[mask]
    return -F.cross_entropy(logits.float(), targets, reduction="none"), mask


def sft_loss(logits: torch.Tensor, labels: torch.Tensor, num_tokens: int | None = None) -> torch.Tensor:
    """R-SFT loss: the negative log-likelihood of the output tokens, averaged over output tokens.

        L = -(1 / N) * sum_{i, t : label[i, t+1] != -100} log p(label[i, t+1] | x[i, <= t])

    N is the number of counted tokens in this batch, or `num_tokens` when the batch is one part of a
    larger step (gradient accumulation, several ranks): then the parts' losses add up to the mean over
    the whole step, as if it were one batch. Prompt and padding tokens add nothing and get no gradient.
    logits (B, T, V) or (N, V) at the output positions (see token_logps), labels (B, T) -> scalar.
    """
    logps, _ = token_logps(logits, labels)
    return -logps.sum() / (len(logps) if num_tokens is None else num_tokens)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(y | x) = the sum of the output tokens' log-probabilities, and the output lengths |y|.

    logits (B, T, V) or (N, V) at the output positions (see token_logps), labels (B, T)
    -> logps (B,) float32, lengths (B,) float32.
    """
    logps, mask = token_logps(logits, labels)
    rows = mask.nonzero()[:, 0]
    return torch.zeros(len(labels), device=logps.device).index_add(0, rows, logps), mask.sum(1).float()


class DPOTerms(NamedTuple):
    """Per-pair values of the HS-DPO loss, each of shape (B,); callers reduce them."""

    loss: torch.Tensor  # w * preference + ftx * sft: what is minimized
    preference: torch.Tensor  # -log sigmoid(r_w - r_l), before the weight
    sft: torch.Tensor  # -log pi(y_w|x) / |y_w| (zeros when ftx is 0)
    chosen_rewards: torch.Tensor  # r_w
    rejected_rewards: torch.Tensor  # r_l

    @property
    def margin(self) -> torch.Tensor:
        return self.chosen_rewards - self.rejected_rewards


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.01,
    weights: torch.Tensor | None = None,
    ftx: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
) -> DPOTerms:
    """HS-DPO loss of each of B preference pairs (x, chosen y_w, rejected y_l, hardness weight w).

    Inputs are (B,) sequence log-probabilities: log pi(y_w|x), log pi(y_l|x) under the policy being
    trained and log ref(y_w|x), log ref(y_l|x) under the frozen R-SFT reference. DPO (Rafailov et al.
    2023, eq. 7) with GuardReasoner's hardness weight on the preference term (section 6) and
    LLaMA-Factory's pref_ftx SFT term on the chosen output, length-normalized:

        r_w = beta * (log pi(y_w|x) - log ref(y_w|x))            implicit reward of the chosen output
        r_l = beta * (log pi(y_l|x) - log ref(y_l|x))            implicit reward of the rejected output
        loss_i = w_i * -log sigmoid(r_w - r_l)  +  ftx * -log pi(y_w|x) / |y_w|

    weights None means w = 1 for every pair (textbook DPO); ftx > 0 needs `chosen_lengths` (B,) = |y_w|.
    Returns the per-pair terms (DPOTerms); the mean of `.loss` is the batch loss, and the share of pairs
    with `.margin` > 0 is the reward accuracy.
    """
    chosen_rewards = beta * (policy_chosen - ref_chosen)
    rejected_rewards = beta * (policy_rejected - ref_rejected)
    preference = -F.logsigmoid(chosen_rewards - rejected_rewards)
    loss = preference if weights is None else weights * preference
    sft = torch.zeros_like(preference)
    if ftx:
        if chosen_lengths is None:
            raise ValueError("ftx > 0 needs chosen_lengths")
        sft = -policy_chosen / chosen_lengths
        loss = loss + ftx * sft
    return DPOTerms(loss, preference, sft, chosen_rewards, rejected_rewards)
