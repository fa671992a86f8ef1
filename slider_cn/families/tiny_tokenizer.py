"""Small tokenizers built offline with the `tokenizers` library, for `tiny` models.

Byte-level BPE with no merges: every byte of the caption is one token, so different captions
give different ids, and nothing has to be downloaded. Each is wrapped as a transformers
``PreTrainedTokenizerFast`` so diffusers pipelines can call it and ``save_pretrained`` it.

- ``build_tiny_tokenizer``: CLIP-style (start and end tokens, padded with the end token).
- ``build_tiny_t5_tokenizer``: T5-style (an end token ``</s>``, padded with ``<pad>`` = id 0).
- ``build_tiny_qwen_tokenizer``: Qwen-style (no start token, padded with ``<|endoftext|>``,
  and a chat template with ``<|im_start|>`` / ``<|im_end|>``, which Z-Image's pipeline applies).
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
MAX_LENGTH = 77

# The shape of Qwen3's chat template for one user turn and a generation prompt; with
# enable_thinking=False Qwen3 adds an empty think block, as here.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}"
    "<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def _byte_vocab(specials: list[str]) -> dict[str, int]:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate(specials)}
    for symbol in alphabet:
        vocab[symbol] = len(vocab)
    return vocab


def _byte_tokenizer(vocab: dict[str, int], specials: list[str]) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(specials)
    return tokenizer


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


def build_tiny_t5_tokenizer(max_length: int = 512) -> PreTrainedTokenizerFast:
    """T5's layout: <pad> = 0, </s> = 1, <unk> = 2; every sequence ends with </s>."""
    specials = ["<pad>", "</s>", "<unk>"]
    vocab = _byte_vocab(specials)
    tokenizer = _byte_tokenizer(vocab, specials)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", vocab["</s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=max_length,
    )


def build_tiny_qwen_tokenizer(max_length: int = 512) -> PreTrainedTokenizerFast:
    """Qwen's layout: no start token, <|endoftext|> pads, chat turns in <|im_start|>...<|im_end|>."""
    specials = [EOS, "<|im_start|>", "<|im_end|>"]
    vocab = _byte_vocab(specials)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=_byte_tokenizer(vocab, specials),
        eos_token="<|im_end|>",
        pad_token=EOS,
        unk_token=EOS,
        model_max_length=max_length,
    )
    wrapped.chat_template = QWEN_CHAT_TEMPLATE
    return wrapped
