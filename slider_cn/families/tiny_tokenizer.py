"""Small tokenizers built offline with the `tokenizers` library, for `tiny` models.

Byte-level BPE with no merges: every byte of the caption is one token, so different captions
give different ids, and nothing has to be downloaded. Each is wrapped as a transformers
``PreTrainedTokenizerFast`` so diffusers pipelines can call it and ``save_pretrained`` it.

- ``build_tiny_tokenizer``: CLIP-style (start and end tokens, padded with the end token).
- ``build_tiny_t5_tokenizer``: T5-style (an end token ``</s>``, padded with ``<pad>`` = id 0).
- ``build_tiny_qwen_tokenizer``: Qwen-style (no start token, padded with ``<|endoftext|>``,
  and a chat template with ``<|im_start|>`` / ``<|im_end|>``, which Z-Image's pipeline applies).
- ``build_tiny_mistral_tokenizer``: Mistral-style (``<s>`` from the chat template, ``[INST]`` /
  ``[SYSTEM_PROMPT]`` turns with list content, padded with ``<pad>``; Flux.2's Pixtral processor).
- ``build_tiny_gemma_tokenizer``: Gemma-style (a ``<bos>`` start token, no end token, padded
  on the right with ``<pad>`` = id 0; Lumina 2 and Sana).
- ``build_tiny_llama_tokenizer``: Llama-3-style (``<|begin_of_text|>`` first, ``<|eot_id|>`` as
  eos, no pad token: HiDream's pipeline pads with eos).
- ``build_tiny_qwen_vl_processor``: a ``Qwen2VLProcessor`` over a Qwen-style tokenizer whose
  merges spell a given template's words as single tokens (Kandinsky 5).
"""

from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
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


def build_tiny_gemma_tokenizer(max_length: int = 512) -> PreTrainedTokenizerFast:
    """Gemma's layout: <pad> = 0, <eos> = 1, <bos> = 2, <unk> = 3; every sequence starts with
    <bos> and gets no end token; padded on the right with <pad> (Lumina 2, Sana)."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    vocab = _byte_vocab(specials)
    tokenizer = _byte_tokenizer(vocab, specials)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=max_length,
        padding_side="right",
    )


# The shape of Mistral Small 3.x's chat template (a system prompt, then user turns whose content
# is a list of text and image parts), which Flux2Pipeline applies through the Pixtral processor.
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['content'] is string %}{% set parts = [{'type': 'text', "
    "'text': message['content']}] %}{% else %}{% set parts = message['content'] %}{% endif %}"
    "{% if message['role'] == 'system' %}[SYSTEM_PROMPT]{% for p in parts %}{{ p['text'] }}"
    "{% endfor %}[/SYSTEM_PROMPT]"
    "{% elif message['role'] == 'user' %}[INST]{% for p in parts %}{% if p['type'] == 'text' %}"
    "{{ p['text'] }}{% else %}[IMG]{% endif %}{% endfor %}[/INST]"
    "{% else %}{% for p in parts %}{{ p['text'] }}{% endfor %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)


def build_tiny_mistral_tokenizer(
    max_length: int = 512, phrases: tuple[str, ...] = ()
) -> PreTrainedTokenizerFast:
    """Mistral's (tekken) layout: <unk> = 0, <s> = 1, </s> = 2, the instruction, system-prompt
    and image markers, <pad>; the chat template adds <s>, padded on the right (Flux.2).

    ``phrases`` become one token each (a pipeline's fixed system message: byte by byte it would
    fill a tiny model's short sequence before the caption begins)."""
    specials = [
        "<unk>",
        "<s>",
        "</s>",
        "[INST]",
        "[/INST]",
        "[SYSTEM_PROMPT]",
        "[/SYSTEM_PROMPT]",
        "[IMG]",
        "[IMG_BREAK]",
        "[IMG_END]",
        "<pad>",
    ]
    vocab = _byte_vocab(specials)
    tokenizer = _byte_tokenizer(vocab, specials)
    tokenizer.add_tokens([AddedToken(p, normalized=False, special=False) for p in phrases])
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=max_length,
        padding_side="right",
    )
    wrapped.chat_template = MISTRAL_CHAT_TEMPLATE
    return wrapped


def build_tiny_llama_tokenizer(max_length: int = 512) -> PreTrainedTokenizerFast:
    """Llama 3.1 Instruct's layout: ``<|begin_of_text|>`` starts every sequence, ``<|eot_id|>``
    ends a turn and is the eos token, and there is no pad token (HiDream's pipeline pads with
    the eos token, on the right)."""
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    vocab = _byte_vocab(specials)
    tokenizer = _byte_tokenizer(vocab, specials)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A",
        special_tokens=[("<|begin_of_text|>", vocab["<|begin_of_text|>"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        model_max_length=max_length,
        padding_side="right",
    )


QWEN_VL_SPECIALS = [
    EOS,
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]


def build_tiny_qwen_vl_processor(max_length: int = 512, words_of: str = ""):
    """Qwen2.5-VL's layout wrapped in a ``Qwen2VLProcessor`` (offline image and video
    processors; text prompts never reach them): Qwen's specials plus the vision ones, padded on
    the right with ``<|endoftext|>``. Every word of ``words_of`` (specials left out) gets BPE
    merges that spell it as one token, as Qwen's real vocabulary does for common words: a
    pipeline that drops a fixed number of template tokens (Kandinsky 5 drops 40) then drops
    exactly its template, not part of the caption."""
    import re

    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    vocab = _byte_vocab(QWEN_VL_SPECIALS)
    merges: list[tuple[str, str]] = []
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    for chunk in re.split("|".join(map(re.escape, QWEN_VL_SPECIALS)), words_of):
        for word, _ in byte_level.pre_tokenize_str(chunk):
            for end in range(2, len(word) + 1):  # left to right: w, wo, wor, word
                if word[:end] not in vocab:
                    vocab[word[:end]] = len(vocab)
                    merges.append((word[: end - 1], word[end - 1]))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None))
    tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(QWEN_VL_SPECIALS)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token=EOS,
        unk_token=EOS,
        model_max_length=max_length,
        padding_side="right",
    )
    return Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(),
        tokenizer=wrapped,
        video_processor=Qwen2VLVideoProcessor(),
    )
