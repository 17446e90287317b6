"""A byte-level tokenizer built locally, for tiny test and demo models.

Ids 0-255 are the bytes themselves, so any text round-trips and the vocabulary
never needs training or a download; 256-258 are the special tokens.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from dist_ft.recipe.prompts import chat_template  # the store renders SFT rows with it too

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
BYTE_VOCAB_SIZE = 256 + 3


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte, the alphabet ByteLevel pre-tokenization emits."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    stand_ins = {b: chr(b) for b in printable}
    next_free = 256
    for b in range(256):
        if b not in stand_ins:
            stand_ins[b] = chr(next_free)
            next_free += 1
    return stand_ins


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer: 256 byte tokens, no merges, plus <|bos|>, <|eos|>, <|pad|>."""
    vocab = {char: byte for byte, char in _byte_to_unicode().items()}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([BOS, EOS, PAD])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   chat_template=chat_template(EOS), model_max_length=1 << 30)
