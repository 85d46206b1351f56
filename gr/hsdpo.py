"""HS-DPO, hard-sample direct preference optimization (paper section 6): what this stage feeds the loop.

The items are preference pairs made by hard-sample mining (gr.mining): the row's prompt with the chosen
(right) and the rejected (wrong) output, and the pair's hardness weight. The R-SFT model is both the
policy's starting point and the frozen reference, so the reference log-probabilities are computed once,
before training, and no second model is held while training.
"""

import torch
from tqdm import tqdm

from gr import distributed
from gr.data import collate, encode_sft
from gr.losses import dpo_loss, output_positions, sequence_logps
from gr.trainer import autocast_for


def make_pairs(tokenizer, hard_samples, template: str, cutoff: int) -> list[dict]:
    """Tokenized pairs {"chosen", "rejected", "weight"} of hard samples (a pair cut to nothing is left out)."""
    pairs = []
    for h in hard_samples:
        chosen, _ = encode_sft(tokenizer, dict(h.row, output=h.chosen), template, cutoff)
        rejected, _ = encode_sft(tokenizer, dict(h.row, output=h.rejected), template, cutoff)
        if chosen and rejected:
            pairs.append({"chosen": chosen, "rejected": rejected, "weight": h.weight})
    return pairs


class DPOTask:
    """HS-DPO on preference pairs against the frozen reference; dev figures are the reward accuracy and
    margin on (up to `eval_pairs` of) the pairs. Chosen and rejected outputs of a micro-batch go through
    the policy in one concatenated forward."""

    def __init__(self, pairs, pad_id: int, beta: float, ftx: float, eval_pairs: int = 256, batch_size: int = 8):
        self.pairs, self.pad_id, self.beta, self.ftx = pairs, pad_id, beta, ftx
        self.eval_pairs, self.batch_size = eval_pairs, batch_size
        self.lengths = [max(len(p["chosen"].input_ids), len(p["rejected"].input_ids)) for p in pairs]
        self.ref = torch.zeros(len(pairs), 2)

    def count(self, indices) -> int:
        """What a step's loss is averaged over: its pairs."""
        return len(indices)

    def _logps(self, model, indices):
        device = next(model.parameters()).device
        batch = collate([self.pairs[i]["chosen"] for i in indices] + [self.pairs[i]["rejected"] for i in indices], self.pad_id)
        labels = batch["labels"].to(device)
        logps, lengths = sequence_logps(model(batch["input_ids"].to(device), logits_at=output_positions(labels)), labels)
        n = len(indices)
        return logps[:n], logps[n:], lengths[:n]

    def _terms(self, model, indices):
        chosen, rejected, lengths = self._logps(model, indices)
        ref = self.ref[indices].to(chosen.device)
        weights = torch.tensor([self.pairs[i]["weight"] for i in indices], device=chosen.device)
        return dpo_loss(chosen, rejected, ref[:, 0], ref[:, 1], beta=self.beta, weights=weights, ftx=self.ftx,
                        chosen_lengths=lengths)

    @torch.no_grad()
    def compute_reference(self, model) -> None:
        """log ref(y_w|x), log ref(y_l|x) of every pair, from the model before any update.

        Under torchrun each rank computes every world-th batch (the same batches as a single process) and
        the ranks sum their tables, in which each row was filled by one rank and is zero elsewhere.
        """
        starts = distributed.share(range(0, len(self.pairs), self.batch_size))
        with autocast_for(next(model.parameters()).device):
            for start in tqdm(starts, desc="reference log-probs", disable=not distributed.is_main()):
                indices = list(range(start, min(start + self.batch_size, len(self.pairs))))
                chosen, rejected, _ = self._logps(model, indices)
                self.ref[indices] = torch.stack([chosen, rejected], 1).float().cpu()
        self.ref = distributed.all_sum(self.ref)

    def loss(self, model, indices, total):
        """(these pairs' summed loss / total, their metrics likewise as the step's mean, tokens processed)."""
        terms = self._terms(model, indices)
        metrics = {
            "rewards/chosen": terms.chosen_rewards.sum() / total,
            "rewards/rejected": terms.rejected_rewards.sum() / total,
            "rewards/accuracy": (terms.margin > 0).float().sum() / total,
            "rewards/margin": terms.margin.sum() / total,
            "loss/preference": terms.preference.sum() / total,
            "loss/sft": terms.sft.sum() / total,
        }
        tokens = sum(len(self.pairs[i]["chosen"].input_ids) + len(self.pairs[i]["rejected"].input_ids) for i in indices)
        return terms.loss.sum() / total, metrics, tokens

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        indices = list(range(min(self.eval_pairs, len(self.pairs))))
        margins = torch.cat([self._terms(model, indices[s:s + self.batch_size]).margin.float().cpu()
                             for s in range(0, len(indices), self.batch_size)])
        return {"pairs_reward_accuracy": (margins > 0).float().mean().item(), "pairs_margin": margins.mean().item()}
