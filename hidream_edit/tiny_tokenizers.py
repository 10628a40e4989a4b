"""Tokenizers for the tiny checkpoint set, trained offline on a small built-in corpus.

The real CLIP, T5 and Llama-3 tokenizers cannot be downloaded here; these are small tokenizers of the
same kinds (byte-level BPE for CLIP and Llama 3 with their special tokens, a SentencePiece unigram for
T5), saved with the hub's file names and config files so the loading code reads them like the real ones.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 512
LLAMA_MAX_LENGTH = 131072
T5_EXTRA_IDS = 100

_CORPUS = (
    "a cat sitting on a red sofa in a sunny living room",
    "a dog running on the beach at sunset, photo",
    "convert the image into a ghibli style",
    "editing instruction: add a hat to the person. target image description: a person wearing a hat",
    "remove the car from the street and keep the buildings",
    "change the color of the sky to orange and purple",
    "make it look like a watercolor painting with soft colors",
    "a portrait of a woman with short dark hair in a light pink t-shirt",
    "replace the background with a snowy mountain landscape",
    "low quality, blurry, distorted",
    "low resolution, blur",
    "turn the photo into a pencil sketch, black and white",
    "a bowl of fresh fruit on a wooden table, studio lighting",
    "the man is holding a sign that says hello world",
    "add a rainbow over the lake and trees in the distance",
    "make the flowers blue instead of yellow",
    "a small house in the forest, night, stars, 4k, highly detailed",
    "give the cat sunglasses and a scarf",
    "it's a bright day; the children are playing in the park!",
    "we'll change the lighting to golden hour, they're smiling",
    "image editing with a diffusion transformer on an ascend npu",
    "numbers 0 1 2 3 4 5 6 7 8 9 and 1024 x 768 pixels",
    "the quick brown fox jumps over the lazy dog",
)

# Regex Llama 3 splits text with before byte-level BPE (public tokenizer spec).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_LLAMA_NAMED_SPECIALS = {
    0: "<|begin_of_text|>",
    1: "<|end_of_text|>",
    4: "<|finetune_right_pad_id|>",
    6: "<|start_header_id|>",
    7: "<|end_header_id|>",
    8: "<|eom_id|>",
    9: "<|eot_id|>",
    10: "<|python_tag|>",
}
_LLAMA_NUM_SPECIALS = 256
_LLAMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return dict(sorted(table.items()))


def _learn_bpe(words: Counter[tuple[str, ...]], max_merges: int) -> list[tuple[str, str]]:
    """Plain BPE: repeatedly merge the most frequent adjacent pair (ties broken by the pair itself)."""
    current = dict(words)
    merges: list[tuple[str, str]] = []
    for _ in range(max_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, freq in current.items():
            for pair in zip(symbols, symbols[1:], strict=False):
                pairs[pair] += freq
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        if pairs[best] < 2:
            break
        merges.append(best)
        current = {_merge_pair(symbols, best): freq for symbols, freq in current.items()}
    return merges


def _merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's layout: 256 byte symbols, the same with `</w>`, merge results, then the two specials."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    splitter = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    words: Counter[tuple[str, ...]] = Counter()
    for line in _CORPUS:
        for word, _ in splitter.pre_tokenize_str(normalizer.normalize_str(line)):
            words[(*word[:-1], word[-1] + "</w>")] += 1
    merges = _learn_bpe(words, max_merges=400)
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def save_clip_tokenizer(out: Path, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=CLIP_MAX_LENGTH)
    tokenizer.save_pretrained(out)
    # The hub folders also carry the slow-tokenizer files; transformers 4.x's CLIPTokenizer needs them.
    write_json(out / "vocab.json", vocab)
    merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (out / "merges.txt").write_text(merges_text, encoding="utf-8")
    specials = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
    }
    _write_hub_tokenizer_config(
        out,
        specials,
        {
            "add_prefix_space": False,
            "clean_up_tokenization_spaces": False,
            "do_lower_case": True,
            "errors": "replace",
            "model_max_length": CLIP_MAX_LENGTH,
            "tokenizer_class": "CLIPTokenizer",
        },
    )


def _t5_pieces() -> list[tuple[str, float]]:
    """A Unigram vocabulary: every corpus character and the frequent word pieces, scored by log frequency."""
    counts: Counter[str] = Counter()
    for line in _CORPUS:
        for word in line.split():
            piece = "▁" + word
            for start in range(len(piece)):
                for end in range(start + 1, min(len(piece), start + 8) + 1):
                    counts[piece[start:end]] += 1
    singles = {p for p in counts if len(p) == 1}
    multi = sorted((p for p in counts if len(p) > 1 and counts[p] >= 2), key=lambda p: (-counts[p] * len(p), p))
    chosen = sorted(singles | set(multi[:300]), key=lambda p: (-counts[p], p))
    total = sum(counts[p] for p in chosen)
    return [(p, math.log(counts[p] / total)) for p in chosen]


def save_t5_tokenizer(out: Path) -> int:
    """Write spiece.model (a real SentencePiece Unigram model) and let transformers derive the rest."""
    from sentencepiece import sentencepiece_model_pb2 as spm
    from transformers import T5Tokenizer

    model = spm.ModelProto()
    for piece, score, kind in (("<pad>", 0.0, 3), ("</s>", 0.0, 3), ("<unk>", 0.0, 2)):
        model.pieces.add(piece=piece, score=score, type=kind)
    for piece, score in _t5_pieces():
        model.pieces.add(piece=piece, score=score, type=1)
    spec = model.trainer_spec
    spec.model_type = spm.TrainerSpec.UNIGRAM
    spec.vocab_size = len(model.pieces)
    spec.pad_id, spec.eos_id, spec.unk_id, spec.bos_id = 0, 1, 2, -1
    spec.pad_piece, spec.eos_piece, spec.unk_piece = "<pad>", "</s>", "<unk>"
    model.normalizer_spec.name = "identity"
    model.normalizer_spec.add_dummy_prefix = True
    model.normalizer_spec.remove_extra_whitespaces = True
    model.normalizer_spec.escape_whitespaces = True
    out.mkdir(parents=True, exist_ok=True)
    (out / "spiece.model").write_bytes(model.SerializeToString(deterministic=True))
    tokenizer = T5Tokenizer.from_pretrained(out, extra_ids=T5_EXTRA_IDS, model_max_length=T5_MAX_LENGTH, legacy=True)
    tokenizer.save_pretrained(out)
    extra = [f"<extra_id_{i}>" for i in range(T5_EXTRA_IDS)]
    specials: dict[str, Any] = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    _write_hub_tokenizer_config(
        out,
        {**specials, "additional_special_tokens": extra},
        {
            "clean_up_tokenization_spaces": True,
            "extra_ids": T5_EXTRA_IDS,
            "legacy": True,
            "model_max_length": T5_MAX_LENGTH,
            "sp_model_kwargs": {},
            "tokenizer_class": "T5Tokenizer",
        },
    )
    return len(tokenizer)


def save_llama_tokenizer(out: Path) -> Any:
    """A Llama-3 style byte-level BPE with the 256 reserved special tokens after the regular vocab."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    splitter = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    words: Counter[tuple[str, ...]] = Counter()
    for line in _CORPUS:
        for word, _ in splitter.pre_tokenize_str(line):
            words[tuple(word)] += 1
    merges = _learn_bpe(words, max_merges=500)
    vocab: dict[str, int] = {}
    for token in [*_bytes_to_unicode().values(), *("".join(m) for m in merges)]:
        vocab.setdefault(token, len(vocab))
    specials = [
        _LLAMA_NAMED_SPECIALS.get(i, f"<|reserved_special_token_{_reserved_index(i)}|>")
        for i in range(_LLAMA_NUM_SPECIALS)
    ]
    bos_id = len(vocab)
    backend = Tokenizer(BPE(vocab=vocab, merges=merges, ignore_merges=True, fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = splitter
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    backend.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<|begin_of_text|> $A",
                pair="<|begin_of_text|> $A <|begin_of_text|>:1 $B:1",
                special_tokens=[("<|begin_of_text|>", bos_id)],
            ),
        ]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        model_max_length=LLAMA_MAX_LENGTH,
        clean_up_tokenization_spaces=True,
        model_input_names=["input_ids", "attention_mask"],
    )
    tokenizer.save_pretrained(out)
    _write_hub_tokenizer_config(
        out,
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
        {
            "chat_template": _LLAMA_CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": True,
            "model_input_names": ["input_ids", "attention_mask"],
            "model_max_length": LLAMA_MAX_LENGTH,
            "tokenizer_class": "PreTrainedTokenizerFast",
        },
    )
    return tokenizer


def _write_hub_tokenizer_config(out: Path, specials: dict[str, Any], settings: dict[str, Any]) -> None:
    """Write tokenizer_config.json and special_tokens_map.json as the hub repos have them.

    transformers 5 saves a slimmer config (class `TokenizersBackend`, no special_tokens_map.json) that
    transformers 4.x cannot read; the hub files are what both versions load.
    """
    added = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))["added_tokens"]
    decoder = {
        str(token["id"]): {k: token[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
        for token in added
    }
    by_content = {token["content"]: value for token, value in zip(added, decoder.values(), strict=True)}

    def described(token: str) -> dict[str, Any]:
        entry = by_content[token]
        return {k: entry[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word")}

    special_map = {
        name: [described(t) for t in value] if isinstance(value, list) else described(value)
        for name, value in specials.items()
    }
    write_json(out / "special_tokens_map.json", special_map)
    write_json(out / "tokenizer_config.json", {**settings, **specials, "added_tokens_decoder": decoder})
    (out / "chat_template.jinja").unlink(missing_ok=True)


def _reserved_index(position: int) -> int:
    """Llama 3 numbers its reserved tokens 0, 1, 2, ... skipping the positions of the named ones."""
    return sum(1 for i in range(position) if i not in _LLAMA_NAMED_SPECIALS)




def write_json(path: Path, data: Any) -> None:
    """JSON with sorted keys and a final newline, so the bytes depend only on the content."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
