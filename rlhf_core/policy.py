"""The policy: a causal language model that writes candidate responses for annotators to judge.

Any Hugging Face causal LM works (an id in the local cache or a directory). With no model
configured, a tiny random GPT-2 is built once under the cache directory (``rlhf_core.tiny``): it
writes gibberish, but the whole pipeline runs offline and in tests.

Generation is batched: prompts are tokenized once, sorted by length, left-padded (a decoder
continues from the last position, so every row's prompt must end there) and sampled
``n`` times each in one ``generate`` call per batch. Only the continuation is returned.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from rlhf_core.device import dtype_kwargs, pick_device, pick_dtype
from rlhf_core.fields import documented
from rlhf_core.tiny import TINY_POLICY_NAME, ensure_tiny_causal_lm

if TYPE_CHECKING:
    # What AutoModelForCausalLM loads, as transformers types it: a PreTrainedModel that generates.
    from transformers.models.auto.modeling_auto import _BaseModelWithGenerate as CausalLM

logger = logging.getLogger(__name__)

FULL_HASH_BYTES = 256 * 1024 * 1024
TINY_POLICY_SEED = 0  # the offline default's weights; PolicyConfig.seed only drives sampling

# ``generate`` samples from torch's global RNG; seeding it for reproducible candidates must not
# interleave with another thread's generation.
_GENERATE_LOCK = threading.Lock()


class PolicyLoadError(RuntimeError):
    """The configured policy model cannot be loaded; the message says what to change."""


@dataclass
class PolicyConfig:
    model: str = documented(
        "",
        "Hugging Face id (in the local cache) or directory of a causal LM. Empty: a tiny random "
        "GPT-2 built offline under the cache directory (for tests and demos).",
    )
    num_candidates: int = documented(2, "Candidate responses generated per prompt.")
    max_new_tokens: int = documented(64, "Longest continuation, in tokens.")
    temperature: float = documented(
        0.8, "Sampling temperature (> 0); higher: more varied candidates."
    )
    top_p: float = documented(
        0.95,
        "Nucleus sampling: sample from the smallest set of tokens with this much probability mass.",
    )
    batch_size: int = documented(
        8, "Prompts per generate call (each sampled num_candidates times)."
    )
    seed: int = documented(0, "Sampling seed: the same prompts and seed give the same candidates.")
    max_prompt_length: int = documented(
        512, "Prompt tokens kept; longer prompts lose their beginning, so the question survives."
    )
    use_chat_template: bool = documented(
        True, "Wrap each prompt as a user turn with the tokenizer's chat template, if it has one."
    )

    def __post_init__(self) -> None:
        for name in ("num_candidates", "max_new_tokens", "batch_size", "max_prompt_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive integer.")
        if self.temperature <= 0:
            raise ValueError(
                f"temperature={self.temperature} must be > 0: candidates are sampled, and greedy "
                "decoding would make every candidate the same."
            )
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1].")


class Policy:
    """A causal LM and its tokenizer, ready to sample candidates. Build with :meth:`load`."""

    def __init__(self, config: PolicyConfig, model: CausalLM, tokenizer: Any, version: str):
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        self.version = version
        self._prompt_limit = _prompt_limit(config, model)
        pad = tokenizer.pad_token_id
        self._pad_id = pad if pad is not None else tokenizer.eos_token_id

    @classmethod
    def load(
        cls,
        config: PolicyConfig,
        cache_dir: str | Path,
        device: str | torch.device | None = None,
    ) -> Policy:
        """``config.model``, or the tiny offline default built under ``cache_dir``."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if config.model:
            source, name = config.model, config.model
        else:
            source = str(ensure_tiny_causal_lm(cache_dir, seed=TINY_POLICY_SEED))
            name = f"{TINY_POLICY_NAME}-seed{TINY_POLICY_SEED}"
        device = pick_device(device)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = AutoModelForCausalLM.from_pretrained(source, **dtype_kwargs(pick_dtype(device)))
        except (OSError, ValueError) as e:  # ValueError: a malformed id
            raise PolicyLoadError(
                f"cannot load the policy {source!r}: {e}. Give a local directory or a model id "
                "that is in the Hugging Face cache (the backend runs offline)."
            ) from e
        # transformers wraps PreTrainedModel.to in functools.wraps, whose stub never binds self.
        model = model.to(device).eval()  # type: ignore[arg-type]
        version = f"{name}@{_fingerprint(source, model)}"
        logger.info("loaded policy %s on %s", version, device)
        return cls(config, model, tokenizer, version)

    @property
    def chats(self) -> bool:
        """Whether prompts are user turns in the tokenizer's chat template (generation and
        training alike)."""
        return self.config.use_chat_template and bool(
            getattr(self.tokenizer, "chat_template", None)
        )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def generate(
        self, prompts: Sequence[str], n: int | None = None, seed: int | None = None
    ) -> list[list[str]]:
        """``n`` (default ``config.num_candidates``) sampled continuations for every prompt.

        Deterministic for the same prompts, ``n`` and ``seed`` (default ``config.seed``) on the
        same machine.
        """
        n = self.config.num_candidates if n is None else n
        if n < 1:
            raise ValueError(f"n={n}: ask for at least one candidate per prompt.")
        seed = self.config.seed if seed is None else seed
        rows = [self._prompt_ids(p) for p in prompts]
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        out: list[list[str]] = [[] for _ in rows]
        size = self.config.batch_size
        for batch_number, start in enumerate(range(0, len(order), size)):
            index = order[start : start + size]
            texts = self._sample([rows[i] for i in index], n, seed + batch_number)
            for k, i in enumerate(index):
                out[i] = texts[k * n : (k + 1) * n]
        return out

    def _prompt_ids(self, prompt: str) -> list[int]:
        tok = self.tokenizer
        if self.chats:
            text = tok.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            ids = tok(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tok(prompt)["input_ids"]
        if not ids:  # an empty prompt: start from the beginning-of-text token
            start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
            ids = [start]
        return ids[-self._prompt_limit :]

    def _left_pad(self, rows: list[list[int]]) -> dict[str, Tensor]:
        """Left padding: each prompt ends at the last position, where generation continues."""
        width = max(len(r) for r in rows)
        input_ids = [[self._pad_id] * (width - len(r)) + r for r in rows]
        attention_mask = [[0] * (width - len(r)) + [1] * len(r) for r in rows]
        return {
            "input_ids": torch.tensor(input_ids, device=self.device),  # (B, T)
            "attention_mask": torch.tensor(attention_mask, device=self.device),  # (B, T)
        }

    def _sample(self, rows: list[list[int]], n: int, seed: int) -> list[str]:
        batch = self._left_pad(rows)
        width = batch["input_ids"].shape[1]
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with _GENERATE_LOCK, torch.random.fork_rng(devices=devices), torch.inference_mode():
            torch.manual_seed(seed)
            output = self.model.generate(
                **batch,
                do_sample=True,
                temperature=self.config.temperature,
                top_p=self.config.top_p,
                max_new_tokens=self.config.max_new_tokens,
                num_return_sequences=n,  # rows come back grouped by prompt: (B * n, T + new)
                pad_token_id=self._pad_id,
            )
        return self.tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)


def _prompt_limit(config: PolicyConfig, model: nn.Module) -> int:
    positions = getattr(model.config, "max_position_embeddings", None) or getattr(
        model.config, "n_positions", None
    )
    if positions is None:
        return config.max_prompt_length
    room = positions - config.max_new_tokens
    if room < 1:
        raise ValueError(
            f"max_new_tokens={config.max_new_tokens} leaves no room for a prompt in the "
            f"model's {positions} positions; lower it."
        )
    return min(config.max_prompt_length, room)


def _fingerprint(source: str, model: CausalLM) -> str:
    """The hub commit when known; else a hash of the config and the weight files.

    Weights are hashed whole up to ``FULL_HASH_BYTES`` (the tiny model, small fine-tunes);
    beyond that their names, sizes and modification times stand in for them.
    """
    commit = getattr(model.config, "_commit_hash", None)
    if commit:
        return commit[:12]
    digest = hashlib.sha256(model.config.to_json_string().encode())
    path = Path(source)
    files = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")) if path.is_dir() else []
    whole = sum(f.stat().st_size for f in files) <= FULL_HASH_BYTES
    for weights in files:
        stat = weights.stat()
        digest.update(
            weights.read_bytes()
            if whole
            else f"{weights.name}:{stat.st_size}:{stat.st_mtime_ns}".encode()
        )
    return digest.hexdigest()[:12]
