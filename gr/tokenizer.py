"""Text <-> token ids with the `tokenizers` library on a checkpoint's tokenizer.json.

Special tokens come from tokenizer_config.json. BOS is added the way the checkpoint's own post-processor
adds it (Llama 3 prepends `<|begin_of_text|>`, SmolLM2 adds nothing), so our ids equal transformers'.
Generation stops on any of the model's end tokens: config's eos ids, the tokenizer's eos and Llama 3's
`<|eot_id|>` (the end of a chat turn, which GuardReasoner was trained to emit).
Text is encoded as text: a user who types `<|eot_id|>` or `<|begin_of_text|>` gets the characters, never
the control token, so no request or response can forge a turn or an end. Only the project's own
templates, through `encode_template`, turn those strings into their ids.

`train_bpe` makes the small byte-level BPE that the from-scratch default run trains on its own data.
"""

import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from gr import GRError

# Llama 3's special tokens; our own tokenizers carry them too, so the chat template works everywhere.
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def _token_text(value) -> str | None:
    """tokenizer_config.json writes a special token as a string or as {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    def __init__(self, tok: HFTokenizer, special: dict, config_eos: list[int] = ()):
        self.tok = tok
        # A second copy that reads special-token strings as plain text (the tokenizers library sets this
        # per tokenizer object, and one object must serve both kinds of call).
        self.text_tok = HFTokenizer.from_str(tok.to_str())
        self.text_tok.encode_special_tokens = True
        self.bos_id = self._id(_token_text(special.get("bos_token")))
        self.eos_id = self._id(_token_text(special.get("eos_token")))
        self.pad_id = self._id(_token_text(special.get("pad_token")))
        if self.pad_id is None:
            self.pad_id = self.eos_id if self.eos_id is not None else 0
        # Does this tokenizer put BOS in front on its own? Then `encode(bos=True)` does too, and only then.
        auto = tok.encode("", add_special_tokens=True).ids
        self.adds_bos = special.get("add_bos_token", bool(auto) and auto[0] == self.bos_id)
        stops = [*config_eos, self.eos_id, self._id("<|eot_id|>")]
        self.stop_ids = sorted({i for i in stops if i is not None})

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.tok.token_to_id(token)

    @classmethod
    def from_folder(cls, folder) -> "Tokenizer":
        """Read tokenizer.json and tokenizer_config.json of a model folder (and its config's eos ids);
        gr.checkpoint.load_tokenizer takes hub ids too."""
        folder = Path(folder)
        if not (folder / "tokenizer.json").exists():
            raise GRError(f"{folder} has no tokenizer.json (only fast-tokenizer files are read)")
        try:
            tok = HFTokenizer.from_file(str(folder / "tokenizer.json"))
            special, config_eos = {}, []
            if (folder / "tokenizer_config.json").exists():
                special = json.loads((folder / "tokenizer_config.json").read_text())
            for name in ("config.json", "generation_config.json"):
                if (folder / name).exists():
                    eos = json.loads((folder / name).read_text()).get("eos_token_id")
                    config_eos += [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        except Exception as e:  # the tokenizers library raises plain Exceptions for a damaged file
            raise GRError(f"{folder}: the tokenizer files cannot be read ({e}): the folder is damaged") from None
        return cls(tok, special, config_eos)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str, bos: bool = True) -> list[int]:
        """Token ids of `text`, read as plain text (`<|eot_id|>` typed in it is characters, not the token),
        with BOS in front when `bos` and the checkpoint's tokenizer adds one."""
        ids = self.text_tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id] + ids if bos and self.adds_bos and self.bos_id is not None else ids

    def encode_template(self, text: str) -> list[int]:
        """Token ids of one of the project's own templates, whose special-token strings become their ids."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)


def train_bpe(texts, vocab_size: int, out_dir) -> Tokenizer:
    """Train a byte-level BPE on `texts` and write tokenizer.json + tokenizer_config.json to `out_dir`.

    Byte-level, so any text encodes (no unknown token). BOS is prepended by the post-processor, as in
    Llama 3, so transformers' AutoTokenizer reads the same ids from these files as we do.
    """
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    bos = SPECIAL_TOKENS[0]
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]),
    ])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    special = {"bos_token": bos, "eos_token": "<|end_of_text|>", "pad_token": "<|end_of_text|>"}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 20, **special}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return Tokenizer(tok, special)

