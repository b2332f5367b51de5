"""An offline tokenizer for random-init models: one token per UTF-8 byte, plus three specials.

The registered ``<family>-tiny`` models have no pretrained tokenizer and the kit downloads
nothing, so they get :func:`byte_tokenizer`: a ``tokenizers`` BPE model with the 256 byte
symbols of GPT-2's byte-level alphabet and no merges (every byte is one token, every text is
encodable, nothing is learnt from data, so every process builds exactly the same tokenizer),
wrapped as a transformers fast tokenizer. Ids::

    0 <pad>   1 <bos>   2 <eos>   3 + b  the byte b (0..255)

A single text is encoded as ``<bos> bytes``; decoding turns the bytes back into UTF-8 text.
The model's vocabulary is sized to it (:data:`BYTE_VOCAB_SIZE`).
"""

from __future__ import annotations

from functools import cache
from typing import Any

SPECIALS = ("<pad>", "<bos>", "<eos>")
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
BYTE_VOCAB_SIZE = len(SPECIALS) + 256

__all__ = ["BOS_ID", "BYTE_VOCAB_SIZE", "EOS_ID", "PAD_ID", "byte_tokenizer"]


def _byte_symbols() -> dict[int, str]:
    """GPT-2's printable stand-in character of every byte (bytes_to_unicode)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


@cache
def _backend_json() -> str:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {s: i for i, s in enumerate(SPECIALS)}
    vocab.update({sym: len(SPECIALS) + b for b, sym in _byte_symbols().items()})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", BOS_ID)])
    tok.add_special_tokens([AddedToken(s, special=True) for s in SPECIALS])
    return tok.to_str()


def byte_tokenizer() -> Any:
    """A fresh byte-level fast tokenizer (``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2, bytes 3..258).

    Returns:
        A ``transformers`` fast tokenizer with ``len() == BYTE_VOCAB_SIZE``.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(_backend_json())  # its own copy: the wrapper configures it
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=SPECIALS[BOS_ID],
                                  eos_token=SPECIALS[EOS_ID], pad_token=SPECIALS[PAD_ID])
    tok.padding_side = "right"
    return tok
