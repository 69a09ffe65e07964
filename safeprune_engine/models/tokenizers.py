"""The byte-level CLIP tokenizer of the built-in models (the toy teacher, the offline SD-sized pipelines) and the
text-encoder config sized to it.

Every byte is a token and there are no merges: the real ``transformers.CLIPTokenizer`` code path without a
49k-entry vocabulary (256 bytes, 256 end-of-word bytes, then <|startoftext|> and <|endoftext|>: 514 tokens).
The shipped toy teacher's ``tokenizer/`` folder was saved from it, so its token ids must never change.
"""
from __future__ import annotations


def _byte_unicode_table() -> list[str]:
    """The 256 printable stand-ins for raw bytes that byte-level BPE tokenizers use (GPT-2/CLIP scheme)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def byte_clip_tokenizer(model_max_length: int = 32):
    """A real transformers.CLIPTokenizer over a byte-level vocabulary (514 tokens)."""
    from transformers import CLIPTokenizer

    chars = _byte_unicode_table()
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    tokenizer.model_max_length = model_max_length
    return tokenizer


def clip_text_config(tokenizer, hidden_size: int, layers: int = 2, heads: int = 4) -> dict:
    """CLIPTextConfig arguments of a small text encoder matched to ``tokenizer`` (vocab, length, special ids)."""
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
