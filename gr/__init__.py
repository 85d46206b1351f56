"""gr: a from-scratch, plain-PyTorch GuardReasoner (Liu et al., 2025).

Each module is one step of the paper or one clear job. From the bottom up: files, model, tokenizer,
prompts, checkpoint, data, generate, losses, distributed, cli, guard; then trainer, rsft (section 4), mining
(section 5), hsdpo (section 6), scoring and evaluate (section 7), teacher and synthesize (section 3), serve.
Imports point down that list, never up.
"""

import sys
from contextlib import contextmanager


class GRError(Exception):
    """A problem the user can fix (a missing file, a model not cached offline, bad input).

    Command lines print its message as one line and exit with status 2, without a traceback.
    """


@contextmanager
def user_errors():
    """Around a command line's work: a GRError ends the program with its one line and exit status 2."""
    try:
        yield
    except GRError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
