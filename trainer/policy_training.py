"""Policy training from the same labels as the reward model: DPO, ILF, and the promotion gate.

- **DPO** (TRL's ``DPOTrainer``) on every preference pair that is not a tie. TRL handles the
  reference model: a frozen copy of the starting policy, or, with LoRA (PEFT), the same weights
  with the adapter switched off. LoRA is used for large models (``lora="auto"``), and the adapter
  is merged before saving so a version loads like any causal LM.
- **ILF** (Scheurer et al., 2023, "Training Language Models with Language Feedback at Scale"):
  for each free-text feedback on a response, the current policy writes refinements conditioned on
  prompt, response and feedback; the refinement most similar to the feedback (cosine similarity of
  the reward model's backbone embeddings) is kept, and the policy is fine-tuned on
  (prompt → refinement) with TRL's ``SFTTrainer``. It runs before DPO, on the same candidate.
  Feedback on the whole item (``ranking.xml``'s notes box) refines the response that annotation
  ranked best; where the annotation ranked none, the policy answers the prompt anew with the
  feedback as guidance.
- **KTO** (Ethayarajh et al., 2024; TRL's ``KTOTrainer``) on unpaired verdicts: thumbs up/down or
  a rating of a single response, and each response of a "both bad" answer as undesirable. It
  runs after DPO, on the same candidate. DPO in the installed TRL has no per-pair margin, so a
  graded pair trains DPO like any decisive pair; its strength reaches the reward model only.
- **The gate** (DPO): the candidate and the serving policy answer the same held-out prompts,
  ``gate_samples`` answers each, with the same sampling seed; the reward model the job serves
  judges each pair (Bradley–Terry probability, mean of the heads). The win rate is averaged per
  prompt and a bootstrap over prompts gives its interval; the candidate is promoted only if the
  interval's lower end is at least ``min_win_rate - gate_margin`` and its mean above
  ``min_win_rate``.
- **The gate under GRPO** cannot be that reward model: GRPO was optimised against it, so reward
  hacking would pass. It is judged on held-out *human* pairs instead: per pair, does the policy
  give the chosen answer a higher mean token log-probability than the rejected one, candidate vs
  serving (paired bootstrap, non-inferiority by ``gate_margin``). And an over-optimisation
  alarm: if the reward ensemble's disagreement (std over heads) on the candidate's answers is
  credibly higher than on the serving policy's, the candidate is rejected.

- **GRPO** (``method="grpo"``, TRL's ``GRPOTrainer``): on-policy RL instead of DPO. For each
  training prompt the policy samples ``grpo_generations`` answers; each is rewarded by the reward
  model's ensemble as ``mean − uncertainty_penalty · std`` over the heads, so an answer the heads
  disagree on (where the reward model is extrapolating, the usual road to reward hacking) earns
  less than its mean. TRL keeps a frozen reference for the KL term when ``kl_coef > 0``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlhf_core.fields import documented
from rlhf_core.policy import Policy
from trainer.distributed import ONE_PROCESS, Ranks
from trainer.reward_training import Pair

logger = logging.getLogger(__name__)

METHODS = ("dpo", "grpo", "off")
LORA_AUTO_PARAMETERS = 300_000_000  # above this, "auto" trains a LoRA adapter, not every weight
REFINE_TEMPLATE = (
    "{prompt}\n\nA draft answer:\n{response}\n\nFeedback on the draft:\n{feedback}\n\n"
    "An improved answer that follows the feedback:\n"
)
GUIDED_TEMPLATE = (  # feedback on the whole item, with no draft to refine
    "{prompt}\n\nWhat a good answer should do:\n{feedback}\n\nAn answer that does this:\n"
)


@dataclass
class PolicyTrainingConfig:
    method: str = documented(
        "dpo", "'dpo' (DPO on pairs), 'grpo' (RL against the reward model) or 'off'; with ILF."
    )
    beta: float = documented(
        0.1, "DPO's KL strength: higher keeps the policy nearer its reference."
    )
    learning_rate: float = documented(5e-5, "Optimizer step size (LoRA runs use 4x this).")
    epochs: int = documented(2, "Passes over the pairs.")
    batch_size: int = documented(8, "Pairs per optimizer step, per process.")
    max_length: int = documented(256, "Longest prompt + response, in tokens; longer ones are cut.")
    lora: str = documented("auto", "'auto' (LoRA above 300M parameters), 'on' or 'off'.")
    lora_rank: int = documented(16, "Rank of the LoRA adapter.")
    ilf_refinements: int = documented(4, "Refinements generated per language feedback (ILF).")
    gate_prompts: int = documented(32, "Held-out prompts the gate compares the two policies on.")
    min_win_rate: float = documented(
        0.5, "Promote only if the reward model prefers the candidate on more than this share."
    )
    gate_samples: int = documented(4, "Answers per gate prompt from each policy (paired).")
    gate_margin: float = documented(
        0.05, "The gate's non-inferiority margin on its interval's lower end."
    )
    seed: int = documented(0, "Seed for data order, sampling and the gate's generations.")
    grpo_generations: int = documented(4, "GRPO: answers sampled per prompt (one group).")
    max_new_tokens: int = documented(64, "GRPO: longest sampled answer, in tokens.")
    uncertainty_penalty: float = documented(
        1.0, "GRPO: reward = ensemble mean - this x ensemble std (resists reward hacking)."
    )
    kl_coef: float = documented(
        0.04, "GRPO: KL strength towards the starting policy (0: no reference)."
    )

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r}: choose one of {', '.join(METHODS)}.")
        if self.lora not in ("auto", "on", "off"):
            raise ValueError(f"lora={self.lora!r}: choose 'auto', 'on' or 'off'.")
        for name in (
            "epochs",
            "batch_size",
            "max_length",
            "lora_rank",
            "gate_prompts",
            "gate_samples",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive integer.")
        if self.ilf_refinements < 0:
            raise ValueError(f"ilf_refinements={self.ilf_refinements} must be >= 0 (0: no ILF).")
        if not 0 <= self.min_win_rate < 1:
            raise ValueError(f"min_win_rate={self.min_win_rate} must be in [0, 1).")
        grpo = self.method == "grpo"
        if self.grpo_generations < 2 or (grpo and self.batch_size % self.grpo_generations):
            raise ValueError(
                f"grpo_generations={self.grpo_generations} must be >= 2 and divide "
                f"batch_size={self.batch_size} (a batch holds whole groups)."
            )
        if self.max_new_tokens < 1 or self.uncertainty_penalty < 0 or self.kl_coef < 0:
            raise ValueError("max_new_tokens must be positive; uncertainty_penalty, kl_coef >= 0.")


@dataclass(frozen=True)
class FeedbackExample:
    prompt: str
    response: str  # the draft the feedback is about; "" for guidance without a draft
    feedback: str


@dataclass(frozen=True)
class UnpairedExample:
    """A verdict on one response (KTO): desirable or not."""

    prompt: str
    completion: str
    label: bool


StepReport = Callable[[int, int, float], None]
# RewardModel.score_heads: per (prompt, responses) item, the per-head rewards (n, K).
Judge = Callable[[list[tuple[str, list[str]]]], list[np.ndarray]]


def uses_lora(config: PolicyTrainingConfig, model: torch.nn.Module) -> bool:
    if config.lora != "auto":
        return config.lora == "on"
    return sum(p.numel() for p in model.parameters()) > LORA_AUTO_PARAMETERS


def train_policy(
    policy: Policy,
    pairs: Sequence[Pair],
    feedback: Sequence[FeedbackExample],
    config: PolicyTrainingConfig,
    similarity: Callable[[list[str], list[str]], np.ndarray] | None = None,
    on_step: StepReport | None = None,
    ranks: Ranks = ONE_PROCESS,
    judge: Judge | None = None,
    unpaired: Sequence[UnpairedExample] = (),
) -> tuple[Policy, dict[str, Any]]:
    """A trained copy of ``policy`` (the original is untouched) and what the training did.

    ``unpaired`` verdicts train it with KTO after DPO (or GRPO).
    ``similarity(texts, feedbacks)`` scores each refinement against its feedback for ILF; without
    it, or without feedback, ILF is skipped. ``judge`` rewards GRPO's samples (required for
    ``method="grpo"``, which trains on the pairs' prompts instead of their labels). Across
    ``ranks``, every rank calls this with the same data: rank 0 generates the ILF refinements
    for all, and TRL shards the examples.
    """
    if config.method == "grpo" and judge is None:
        raise ValueError("GRPO needs a judge: the reward model that rewards the samples.")
    candidate = Policy(
        policy.config, copy.deepcopy(policy.model), policy.tokenizer, f"{policy.version}+trained"
    )
    stats: dict[str, Any] = {
        "dpo_pairs": 0,
        "ilf_examples": 0,
        "kto_examples": 0,
        "processes": ranks.count,
    }
    started = time.monotonic()
    if feedback and similarity is not None and config.ilf_refinements:
        refined = ranks.share(
            ilf_refinements(policy, feedback, config.ilf_refinements, similarity)
            if ranks.is_main
            else []
        )
        stats["ilf_examples"] = len(refined)
        stats["ilf"] = _fit(candidate, "sft", refined, config, on_step)
    usable = [p for p in pairs if p.chosen != p.rejected]
    if config.method == "grpo" and pairs:
        prompts = [{"prompt": p} for p in dict.fromkeys(pair.prompt for pair in pairs)]
        stats["grpo_prompts"] = len(prompts)
        reward = penalized_reward(judge, config.uncertainty_penalty)  # type: ignore[arg-type]
        stats["grpo"] = _fit(candidate, "grpo", prompts, config, on_step, reward)
    elif usable:
        stats["dpo_pairs"] = len(usable)
        stats["dpo"] = _fit(candidate, "dpo", [p.__dict__ for p in usable], config, on_step)
    if unpaired:
        stats["kto_examples"] = len(unpaired)
        stats["kto"] = _fit(candidate, "kto", [u.__dict__ for u in unpaired], config, on_step)
    stats["train_seconds"] = round(time.monotonic() - started, 3)
    candidate.model.eval()
    return candidate, stats


def penalized_reward(judge: Judge, penalty: float) -> Callable[..., list[float | None]]:
    """GRPO's reward function: per completion, the heads' mean reward minus ``penalty`` × their
    standard deviation (TRL calls it with the batch's prompts and completions; its type allows
    None for "no reward", which this one never gives)."""

    def reward(prompts: list[Any], completions: list[Any], **_: Any) -> list[float | None]:
        items = [(_text(p), [_text(c)]) for p, c in zip(prompts, completions, strict=True)]
        heads = judge(items)
        return [float(h[0].mean() - penalty * h[0].std()) for h in heads]

    return reward


def ilf_refinements(
    policy: Policy,
    feedback: Sequence[FeedbackExample],
    n: int,
    similarity: Callable[[list[str], list[str]], np.ndarray],
) -> list[dict[str, str]]:
    """ILF's data: per feedback, the one of ``n`` refinements that best matches the feedback."""
    prompts = [
        (REFINE_TEMPLATE if f.response else GUIDED_TEMPLATE).format(**f.__dict__) for f in feedback
    ]
    refinements = policy.generate(prompts, n)
    examples = []
    for item, texts in zip(feedback, refinements, strict=True):
        texts = [t for t in texts if t.strip()]
        if not texts:
            continue
        scores = similarity(texts, [item.feedback] * len(texts))
        examples.append({"prompt": item.prompt, "completion": texts[int(np.argmax(scores))]})
    return examples


def _fit(
    policy: Policy,
    method: str,
    rows: list[dict[str, str]],
    config: PolicyTrainingConfig,
    on_step: StepReport | None,
    reward: Callable[..., list[float | None]] | None = None,
) -> dict[str, float]:
    """One TRL run (``dpo``, ``kto``, ``sft`` or ``grpo`` with ``reward``) on ``policy.model``,
    in place.

    A policy that answers in its chat template is trained in it too: the rows go to TRL as
    conversations (user prompt, assistant answer), and TRL applies the template.
    """
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import (
        DPOConfig,
        DPOTrainer,
        GRPOConfig,
        GRPOTrainer,
        KTOConfig,
        KTOTrainer,
        SFTConfig,
        SFTTrainer,
    )

    lora = uses_lora(config, policy.model)
    common: dict[str, Any] = dict(
        output_dir=tempfile.mkdtemp(prefix=f"rlhf-{method}-"),
        per_device_train_batch_size=config.batch_size,
        num_train_epochs=config.epochs,
        learning_rate=config.learning_rate * (4 if lora else 1),
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        gradient_checkpointing=False,  # models that fit without it train faster without it
        seed=config.seed,
        use_cpu=policy.device.type == "cpu",
        bf16=policy.device.type == "cuda" and torch.cuda.is_bf16_supported(),
    )
    tokenizer = policy.tokenizer
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    peft_config = _lora_config(config) if lora else None
    callbacks = [_progress_callback(on_step)] if on_step is not None else []
    dataset = Dataset.from_list(_as_conversations(rows) if policy.chats else rows)
    policy.model.train()
    if method == "dpo":
        trainer: Any = DPOTrainer(
            model=policy.model,
            args=DPOConfig(beta=config.beta, max_length=config.max_length, **common),
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=callbacks,
        )
    elif method == "kto":
        trainer = KTOTrainer(
            model=policy.model,
            # KTO estimates its KL term from the other examples of a batch: at least two.
            args=KTOConfig(
                beta=config.beta,
                max_length=config.max_length,
                **{**common, "per_device_train_batch_size": max(2, config.batch_size)},
            ),
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=callbacks,
        )
    elif method == "grpo":
        args = GRPOConfig(
            num_generations=config.grpo_generations,
            max_completion_length=config.max_new_tokens,
            temperature=policy.config.temperature,
            top_p=policy.config.top_p,
            beta=config.kl_coef,
            **common,
        )
        trainer = GRPOTrainer(
            model=policy.model,
            reward_funcs=reward,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=callbacks,
        )
    else:
        trainer = SFTTrainer(
            model=policy.model,
            args=SFTConfig(completion_only_loss=True, max_length=config.max_length, **common),
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=callbacks,
        )
    trainer.remove_callback(PrinterCallback)  # progress goes to our log and /metrics instead
    output = trainer.train()
    model = trainer.model
    if peft_config is not None:
        model = model.merge_and_unload()  # a version is a plain causal LM
    policy.model = model.eval()
    history = trainer.state.log_history
    losses = [e["loss"] for e in history if "loss" in e]
    stats = {
        "steps": output.global_step,
        "first_loss": round(losses[0], 4) if losses else math.nan,
        "last_loss": round(losses[-1], 4) if losses else math.nan,
        "lora": lora,
    }
    rewards = [e["reward"] for e in history if "reward" in e]  # GRPO: mean penalized reward
    if rewards:
        stats["first_reward"], stats["last_reward"] = round(rewards[0], 4), round(rewards[-1], 4)
    return stats


def _as_conversations(rows: list[dict[str, str]]) -> list[dict[str, Any]]:
    """TRL's conversational format: the prompt a user turn, each answer an assistant turn."""
    conversations = []
    for row in rows:
        turns: dict[str, Any] = {"prompt": [{"role": "user", "content": row["prompt"]}]}
        for key in ("chosen", "rejected", "completion"):
            if key in row:
                turns[key] = [{"role": "assistant", "content": row[key]}]
        if "label" in row:  # KTO's verdict
            turns["label"] = row["label"]
        conversations.append(turns)
    return conversations


def _text(turns: str | list[dict[str, str]]) -> str:
    """A plain prompt or completion, or the last turn's text of a conversational one."""
    return turns if isinstance(turns, str) else turns[-1]["content"]


def _lora_config(config: PolicyTrainingConfig) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=config.lora_rank,
        lora_alpha=2 * config.lora_rank,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )


def _progress_callback(report: StepReport) -> Any:
    """A Trainer callback forwarding step and loss to our progress report (log, /metrics, CLI)."""
    from transformers import TrainerCallback

    class ProgressCallback(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **_: Any) -> None:
            if logs and "loss" in logs:
                report(state.global_step, state.max_steps, float(logs["loss"]))

    return ProgressCallback()


@dataclass(frozen=True)
class GateResult:
    win_rate: float
    prompts: int
    promote: bool
    reason: str
    evidence: dict[str, Any] = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "evidence"} | self.evidence


def _bootstrap(values: np.ndarray, seed: int, confidence: float = 0.95) -> tuple[float, float]:
    from trainer.reward_training import paired_bootstrap_interval

    return paired_bootstrap_interval(values, confidence, seed=seed)


def policy_gate(
    judge: Callable[[list[tuple[str, list[str]]]], list[np.ndarray]],
    candidate: Policy,
    serving: Policy,
    prompts: Sequence[str],
    config: PolicyTrainingConfig,
) -> GateResult:
    """Does the reward model prefer the candidate's answers to the serving policy's?

    ``judge`` is ``RewardModel.score_heads``: per item, the per-head rewards (2, K). Both policies
    sample ``gate_samples`` answers per prompt with the same seed, so the comparison is paired.
    The win rate is the mean Bradley–Terry probability that the candidate's answer is better;
    its interval comes from a bootstrap over prompts (samples of a prompt are not independent).
    """
    prompts = list(prompts)[: config.gate_prompts]
    k = config.gate_samples
    evidence: dict[str, Any] = {"rule": "reward-model win rate", "prompts": len(prompts)}
    if not prompts:
        return GateResult(math.nan, 0, False, "no prompts to compare the policies on", evidence)
    ours = candidate.generate(prompts, k, seed=config.seed)
    theirs = serving.generate(prompts, k, seed=config.seed)
    items = [(p, [a, b]) for p, a_s, b_s in zip(prompts, ours, theirs) for a, b in zip(a_s, b_s)]
    rewards = judge(items)
    margins = np.array([r[0].mean() - r[1].mean() for r in rewards])  # mean over heads
    per_prompt = (1.0 / (1.0 + np.exp(-margins))).reshape(len(prompts), k).mean(axis=1)  # (P,)
    win_rate = float(per_prompt.mean())
    low, high = _bootstrap(per_prompt, config.seed)
    floor = config.min_win_rate - config.gate_margin
    promote = win_rate > config.min_win_rate and low >= floor
    evidence.update(n=len(items), samples=k, ci_low=low, ci_high=high, floor=floor)
    reason = (
        f"reward-model win rate {win_rate:.3f} on {len(prompts)} prompts x {k} samples "
        f"(95% interval {low:.3f}..{high:.3f}): "
        + ("above" if promote else "not above")
        + f" {config.min_win_rate} with the lower end at least {floor:.2f}"
    )
    return GateResult(round(win_rate, 4), len(prompts), promote, reason, evidence)


def mean_logprob(policy: Policy, prompt: str, response: str) -> float:
    """Mean token log p(response | prompt) under the policy (teacher forcing, its template)."""
    prompt_ids = policy._prompt_ids(prompt)
    response_ids = policy.tokenizer(response, add_special_tokens=False)["input_ids"] or [
        policy.tokenizer.eos_token_id
    ]
    ids = torch.tensor([prompt_ids + response_ids], device=policy.device)  # (1, T)
    with torch.inference_mode():
        logits = policy.model(ids).logits[0, :-1].float()  # (T-1, V)
    logps = torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None])[:, 0]  # (T-1,)
    return float(logps[len(prompt_ids) - 1 :].mean())


def grpo_gate(
    judge: Callable[[list[tuple[str, list[str]]]], list[np.ndarray]],
    candidate: Policy,
    serving: Policy,
    heldout: Sequence[Any],
    config: PolicyTrainingConfig,
) -> GateResult:
    """A GRPO candidate judged by what it was not optimised against: held-out human pairs.

    Per decisive held-out pair (``Pair``), each policy is right when it gives the chosen answer
    the higher mean token log-probability; promotion needs the paired-bootstrap interval of the
    accuracy difference to stay above ``-gate_margin``. The reward ensemble still looks at the
    policies' answers, only for the over-optimisation alarm: its heads disagreeing credibly
    more on the candidate's answers than on the serving policy's rejects the candidate.
    """
    pairs = [p for p in heldout if not p.tie]
    evidence: dict[str, Any] = {"rule": "held-out human pairs (GRPO)", "n": len(pairs)}
    if not pairs:
        reason = "GRPO: no held-out human pairs to judge on yet; not promoted"
        return GateResult(math.nan, 0, False, reason, evidence)
    correct = np.array(
        [
            [
                mean_logprob(policy, p.prompt, p.chosen)
                > mean_logprob(policy, p.prompt, p.rejected)
                for policy in (candidate, serving)
            ]
            for p in pairs
        ],
        dtype=float,
    )  # (n, 2)
    low, high = _bootstrap(correct[:, 0] - correct[:, 1], config.seed)
    alarm = _disagreement_alarm(judge, candidate, serving, pairs, config, evidence)
    promote = low >= -config.gate_margin and not alarm
    evidence.update(
        candidate_accuracy=float(correct[:, 0].mean()),
        serving_accuracy=float(correct[:, 1].mean()),
        ci_low=low,
        ci_high=high,
        over_optimisation_alarm=alarm,
    )
    reason = (
        f"GRPO judged on {len(pairs)} held-out human pairs: accuracy "
        f"{correct[:, 0].mean():.3f} vs serving {correct[:, 1].mean():.3f} (difference 95% "
        f"interval {low:+.3f}..{high:+.3f}, margin {config.gate_margin})"
        + ("; over-optimisation alarm: ensemble disagreement rose" if alarm else "")
    )
    return GateResult(float(correct[:, 0].mean()), len(pairs), promote, reason, evidence)


def _disagreement_alarm(
    judge: Callable[[list[tuple[str, list[str]]]], list[np.ndarray]],
    candidate: Policy,
    serving: Policy,
    pairs: Sequence[Any],
    config: PolicyTrainingConfig,
    evidence: dict[str, Any],
) -> bool:
    """True when the heads' std on the candidate's answers is credibly above the serving's."""
    prompts = list(dict.fromkeys(p.prompt for p in pairs))[: config.gate_prompts]
    k = config.gate_samples
    ours = candidate.generate(prompts, k, seed=config.seed)
    theirs = serving.generate(prompts, k, seed=config.seed)
    heads = judge([(p, a + b) for p, a, b in zip(prompts, ours, theirs)])  # each (2k, K)
    spread = np.array([[h[:k].std(axis=1).mean(), h[k:].std(axis=1).mean()] for h in heads])
    low, _ = _bootstrap(spread[:, 0] - spread[:, 1], config.seed)
    evidence.update(
        disagreement_candidate=float(spread[:, 0].mean()),
        disagreement_serving=float(spread[:, 1].mean()),
        disagreement_rise_ci_low=low,
    )
    return bool(low > 0)


def save_policy(policy: Policy, path: Path) -> None:
    policy.model.save_pretrained(path, safe_serialization=True)
    policy.tokenizer.save_pretrained(path)
