"""gr: a from-scratch, plain-PyTorch GuardReasoner (Liu et al., 2025).

Each module is one step of the paper: model, checkpoint, tokenizer, prompts, data, generate, losses,
trainer, mining, evaluate, synthesize.
"""


class GRError(Exception):
    """A problem the user can fix (a missing file, a model not cached offline, bad input).

    Command lines print its message as one line and exit with status 2, without a traceback.
    """
