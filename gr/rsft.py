"""R-SFT, reasoning supervised fine-tuning (paper section 4): what this stage feeds the training loop.

The items are tokenized rows (gr.data.Example: prompt masked, output and its stop token learned); the loss
of a micro-batch is the NLL of its output tokens divided by the whole step's count of output tokens, so
that micro-batches and ranks add up to the step's mean (see gr.trainer).
"""

import torch

from gr.data import IGNORE, Example, collate
from gr.losses import output_positions, sft_loss


class SFTTask:
    """R-SFT on tokenized examples; dev figures are the dev loss."""

    def __init__(self, examples: list[Example], dev_examples: list[Example], pad_id: int, eval_batch_size: int = 8):
        self.examples, self.dev, self.pad_id, self.eval_batch_size = examples, dev_examples, pad_id, eval_batch_size
        self.lengths = [len(e.input_ids) for e in examples]
        # Output tokens per example, counted once: every step asks for them.
        self.targets = [sum(label != IGNORE for label in e.labels[1:]) for e in examples]

    def count(self, indices) -> int:
        """What a step's loss is averaged over: its output tokens."""
        return sum(self.targets[i] for i in indices)

    def loss(self, model, indices, total):
        """(NLL of these examples' output tokens / total, no metrics, tokens processed)."""
        device = next(model.parameters()).device
        batch = collate([self.examples[i] for i in indices], self.pad_id)
        labels = batch["labels"].to(device)
        logits = model(batch["input_ids"].to(device), logits_at=output_positions(labels))
        return sft_loss(logits, labels, num_tokens=total), {}, sum(self.lengths[i] for i in indices)

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        if not self.dev:
            return {}
        device = next(model.parameters()).device
        total = sum(sum(label != IGNORE for label in e.labels[1:]) for e in self.dev)
        nll = torch.zeros((), device=device)
        for start in range(0, len(self.dev), self.eval_batch_size):
            batch = collate(self.dev[start:start + self.eval_batch_size], self.pad_id)
            labels = batch["labels"].to(device)
            logits = model(batch["input_ids"].to(device), logits_at=output_positions(labels))
            nll += sft_loss(logits, labels, num_tokens=total)
        return {"dev_loss": nll.item()}
