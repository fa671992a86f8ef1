"""A small CLIP-style tokenizer built offline with the `tokenizers` library.

Byte-level BPE with no merges: every byte of the caption is one token, so different captions
give different ids, and nothing has to be downloaded. It is wrapped as a transformers
``PreTrainedTokenizerFast`` so diffusers pipelines can call it and ``save_pretrained`` it.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
MAX_LENGTH = 77


def build_tiny_tokenizer(max_length: int = MAX_LENGTH) -> PreTrainedTokenizerFast:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}",
        special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])],
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,  # CLIP pads with its end token
        unk_token=EOS,
        model_max_length=max_length,
    )
    return wrapped
