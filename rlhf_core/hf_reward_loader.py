"""Load an exported reward model with torch, transformers and safetensors alone.

``rlhf-backend export --version`` copies this file next to the checkpoint as
``load_reward_model.py``::

    from load_reward_model import load
    rm = load("DIR/reward_model")
    rm.head_rewards("a prompt", ["response a", "response b"])  # (2, K): one reward per head
    rm.rewards("a prompt", ["response a", "response b"])       # (2,): the ensemble's mean

Each (prompt, response) is encoded as a text pair by the backbone and mean-pooled; K heads read
the layer-normed embedding x, head k giving ``f_k(x) + prior_scale * p_k(x)`` (a trained part
and a frozen random prior). P(a beats b) = mean over heads of sigmoid(r_k(a) - r_k(b)); the heads'
spread is the model's uncertainty.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer


class ExportedRewardModel:
    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        self.config = json.loads((path / "config.json").read_text())["config"]
        self.tokenizer = AutoTokenizer.from_pretrained(path / "backbone")
        self.backbone = AutoModel.from_pretrained(path / "backbone").float().eval()
        self.heads = {k: v.float() for k, v in load_file(path / "heads.safetensors").items()}

    @torch.no_grad()
    def embed(self, prompt: str, responses: list[str]) -> torch.Tensor:
        """Pooled embeddings of (prompt, response) pairs: (N, H)."""
        enc = self.tokenizer(
            [prompt] * len(responses),
            list(responses),
            truncation=True,
            max_length=self.config["max_length"],
            padding=True,
            return_tensors="pt",
        )
        mask = enc["attention_mask"]  # (N, T)
        if self.config["pooling"] == "response_mean":  # only the response's tokens
            response = torch.tensor(
                [[int(s == 1) for s in enc.sequence_ids(i)] for i in range(len(responses))]
            )
            mask = torch.where(response.sum(1, keepdim=True) > 0, response, mask)
        hidden = self.backbone(**enc).last_hidden_state.float()  # (N, T, H)
        weights = mask.unsqueeze(-1).float()  # (N, T, 1)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)

    @torch.no_grad()
    def head_rewards(self, prompt: str, responses: list[str]) -> torch.Tensor:
        """Every head's reward for each response: (N, K)."""
        emb = self.embed(prompt, responses)
        x = F.layer_norm(emb, emb.shape[-1:])  # (N, H)
        h = self.heads
        if "w1" in h:  # MLP heads: (K, H, D) then (K, D)
            hidden = F.gelu(torch.einsum("nh,khd->nkd", x, h["w1"]) + h["b1"])
            trainable = torch.einsum("nkd,kd->nk", hidden, h["w2"]) + h["b2"]
            prior_hidden = F.gelu(torch.einsum("nh,khd->nkd", x, h["prior_w1"]))
            prior = torch.einsum("nkd,kd->nk", prior_hidden, h["prior_w2"])
        else:  # linear heads: (K, H)
            trainable = x @ h["w2"].T + h["b2"]
            prior = x @ h["prior_w2"].T
        return trainable + self.config["prior_scale"] * prior

    def rewards(self, prompt: str, responses: list[str]) -> torch.Tensor:
        """The ensemble's reward for each response: (N,)."""
        return self.head_rewards(prompt, responses).mean(dim=-1)


def load(path: str | Path) -> ExportedRewardModel:
    return ExportedRewardModel(path)
