"""Tiny models and tokenizers built from a config, for tests and the offline default policy.

Nothing here downloads anything: the tokenizers are trained in memory on a small built-in
corpus with the ``tokenizers`` library, the models are randomly initialised from a config, and
both are written with ``save_pretrained`` so they load by path like any Hugging Face model.
The same seed gives the same weights (on the same torch version), and building never touches the
global torch RNG.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     path = build_tiny_causal_lm(f"{d}/lm", seed=0)
    ...     sorted(p.name for p in path.iterdir())[:2]
    ['config.json', 'generation_config.json']
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

logger = logging.getLogger(__name__)

TINY_POLICY_NAME = "tiny-gpt2"
TINY_ENCODER_NAME = "tiny-bert"

# Enough text for a few hundred merges; the models are random, so the tokenizers only need to
# split ordinary English prompts and answers into plausible pieces.
CORPUS = [
    "Explain why the sky is blue in simple terms.",
    "Sunlight scatters off the molecules of the air, and blue light scatters the most.",
    "Write a short poem about autumn leaves falling in the cold wind.",
    "What is seventeen times twenty three? The answer is 391.",
    "Give me three practical tips for learning a new language every day.",
    "Practice for ten minutes daily, read simple books, and talk with native speakers.",
    "Summarize the main idea of the following paragraph in one sentence.",
    "The quick brown fox jumps over the lazy dog while the cat sleeps.",
    "Translate this sentence into French: I would like a cup of coffee, please.",
    "Is it safe to eat raw cookie dough? Raw eggs and flour can carry bacteria.",
    "How do I reverse a list in Python? Use reversed(items) or items[::-1].",
    "A reward model scores how much people prefer one response over another.",
    "The annotator chose the first answer because it was shorter and more accurate.",
    "Please be helpful, honest and harmless when you answer the user's question.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000; symbols: ( ) [ ] { } , . ; : ! ? ' \" - + = / *",
    "Once upon a time there was a small robot who wanted to learn how to paint.",
    "Compare the two responses and decide which one is better, or call it a tie.",
    "Label Studio shows each task to an annotator, who ranks the candidate answers.",
]


def train_bert_tokenizer() -> PreTrainedTokenizerFast:
    """A lower-casing BERT-style tokenizer: ``[CLS] a [SEP] b [SEP]`` with token type ids.

    The WordPiece vocabulary is built directly (every corpus word, every character, every
    ``##`` character) instead of with the WordPiece trainer, which breaks ties in hash-map
    order and so gives a different vocabulary on every run.
    """
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words = {
        word
        for line in CORPUS
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(line))
    }
    chars = sorted({c for word in words for c in word})
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    pieces = specials + chars + [f"##{c}" for c in chars] + sorted(words - set(chars))
    tok = Tokenizer(models.WordPiece({p: i for i, p in enumerate(pieces)}, unk_token="[UNK]"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
        model_max_length=512,
    )


def train_byte_bpe_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE tokenizer (any text encodes); pads on the left."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        CORPUS,
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        model_input_names=["input_ids", "attention_mask"],
        model_max_length=512,
    )


def build_tiny_encoder(
    path: str | Path,
    seed: int = 0,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
) -> Path:
    """A random BERT encoder + WordPiece tokenizer saved at ``path``; returns the path."""
    tokenizer = train_bert_tokenizer()
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertModel(config)
    return _save(path, model, tokenizer)


def build_tiny_causal_lm(
    path: str | Path,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
) -> Path:
    """A random GPT-2 + byte-level BPE tokenizer saved at ``path``; returns the path."""
    tokenizer = train_byte_bpe_tokenizer()
    eos = tokenizer.eos_token_id
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=512,
        n_embd=hidden_size,
        n_layer=num_layers,
        n_head=num_heads,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    return _save(path, model, tokenizer)


def ensure_tiny_causal_lm(cache_dir: str | Path, seed: int = 0) -> Path:
    """The tiny policy under ``cache_dir``, built once (safe when several workers race)."""
    target = Path(cache_dir) / f"{TINY_POLICY_NAME}-seed{seed}"
    if not (target / "config.json").exists():
        _build_atomically(target, lambda tmp: build_tiny_causal_lm(tmp, seed=seed))
    return target


def ensure_tiny_encoder(cache_dir: str | Path, seed: int = 0) -> Path:
    """The tiny encoder under ``cache_dir``, built once (safe when several workers race)."""
    target = Path(cache_dir) / f"{TINY_ENCODER_NAME}-seed{seed}"
    if not (target / "config.json").exists():
        _build_atomically(target, lambda tmp: build_tiny_encoder(tmp, seed=seed))
    return target


def _save(path: str | Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast) -> Path:
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _build_atomically(target: Path, build) -> None:
    # Build next to the target and rename: a reader never sees a half-written model, and when
    # two processes race, the loser's copy is simply thrown away.
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        os.rename(tmp, target)
        logger.info("built %s", target)
    except OSError:
        if not (target / "config.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
