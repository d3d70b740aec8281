"""The pretraining job's configuration: typed dataclasses, registered with Hydra's ConfigStore.

`conf/*.yaml` holds presets and overrides only; this file is the schema. Derived values
(gradient accumulation, the peak learning rate of a preset) are computed once, in
`validate_job`, which every rank runs before any heavy work.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from hydra.core.config_store import ConfigStore

from llama_dist.config_keys import to_typed_config
from llama_dist.data.config import DataConfig
from llama_dist.data.reward_data import RewardDataConfig
from llama_dist.data.sft import SFTDataConfig
from llama_dist.models.config import LlamaConfig, RopeScaling, get_preset
from llama_dist.parallel.config import ACConfig, ParallelConfig
from llama_dist.planner.launch_check import resolve_job_grad_sync
from llama_dist.rlhf.context_distillation import ANSWER_TEMPLATES, PLACEMENTS, SAFETY_ADJECTIVES

# Peak learning rates: llama2.md ("Pretraining"), and larger ones for the small presets,
# which tolerate (and need, to learn in minutes) a higher rate.
PEAK_LR = {
    "debug": 3e-3,
    "tiny": 1e-3,
    "small": 6e-4,
    "7b": 3e-4,
    "13b": 3e-4,
    "34b": 1.5e-4,
    "70b": 1.5e-4,
}


ATTENTION_CHOICES = ("auto", "sdpa", "flex")


def run_device_type(device: str) -> str:
    """The device type a run with `train.device` gets ("auto": cuda when one is visible)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_attention(
    choice: str, *, device_type: str, document_mask: bool, key: str = "attention"
) -> str:
    """The attention backend for `llama_dist.models.llama.set_attention_backend` when training
    on `device_type` ("cpu", "cuda"), with `document_mask` if the batches carry document ids:
    `choice` itself, or for "auto" flex on CUDA with document masks and sdpa elsewhere."""
    if choice not in ATTENTION_CHOICES:
        raise ValueError(f"{key}={choice!r} must be auto, sdpa or flex")
    if choice == "flex" and device_type == "cpu":
        raise ValueError(
            f"{key}=flex cannot train on CPU: FlexAttention has no backward on CPU in "
            f"torch 2.13; use {key}=sdpa (the dense mask) or auto"
        )
    if choice == "auto":
        return "flex" if device_type == "cuda" and document_mask else "sdpa"
    return choice


@dataclass
class ModelConfig:
    """A preset plus overrides; a field left at None keeps the preset's value."""

    preset: str = "debug"  # debug | tiny | small | 7b | 13b | 34b | 70b
    # Instead of the preset: the shape in an HF config.json, a llama_dist model_config.json,
    # or a folder holding one (an HF model folder, a checkpoint); the fields below override it.
    from_file: str | None = None
    dim: int | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None
    vocab_size: int | None = None
    multiple_of: int | None = None
    ffn_dim_multiplier: float | None = None
    ffn_hidden_dim: int | None = None  # explicit FFN hidden size
    norm_eps: float | None = None
    rope_theta: float | None = None  # a new base frequency, e.g. for long-context training
    rope_scaling: str | None = None  # none | linear (position interpolation)
    rope_factor: float | None = None  # positions are divided by this with rope_scaling=linear
    max_seq_len: int | None = None  # rotary table length; defaults to data.seq_len if longer
    # How packed documents are kept apart; a run setting, not part of the saved model shape.
    # auto: flex on CUDA when document masks are used, sdpa elsewhere.
    attention: str = "auto"  # auto | sdpa | flex

    def resolve_attention(self, *, device_type: str, document_mask: bool) -> str:
        """The attention backend of this run (see `resolve_attention`)."""
        return resolve_attention(
            self.attention,
            device_type=device_type,
            document_mask=document_mask,
            key="model.attention",
        )

    def build(self) -> LlamaConfig:
        if self.attention not in ATTENTION_CHOICES:
            raise ValueError(f"model.attention={self.attention!r} must be auto, sdpa or flex")
        overrides: dict[str, Any] = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(LlamaConfig)
            if hasattr(self, f.name) and getattr(self, f.name) is not None
        }
        overrides.pop("rope_scaling", None)
        if self.from_file is not None:
            from llama_dist.checkpoint.init import model_config_from_path

            base = model_config_from_path(self.from_file)
        else:
            base = get_preset(self.preset)
        if self.rope_factor is not None and self.rope_scaling != "linear":
            raise ValueError(
                f"model.rope_factor={self.rope_factor} has no effect without "
                "model.rope_scaling=linear; set both"
            )
        if self.rope_scaling == "linear" and self.rope_factor is None:
            raise ValueError("model.rope_scaling=linear needs model.rope_factor (e.g. 2.0)")
        if self.rope_scaling is not None:
            overrides["rope_scaling"] = RopeScaling(
                kind=self.rope_scaling, factor=self.rope_factor or 1.0
            )
        return base.replace(**overrides)


@dataclass
class OptimConfig:
    """AdamW with linear warmup and cosine decay (llama2.md, "Pretraining")."""

    lr: float | None = None  # peak learning rate; None = the preset's (PEAK_LR)
    min_lr_ratio: float = 0.1  # cosine decays to this fraction of the peak
    warmup_steps: int | None = 2000  # None: 3% of the steps, at least 5 (llama2.md, RMs)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-5
    weight_decay: float = 0.1
    decay_norms: bool = False  # apply weight decay to the RMSNorm weights too
    clip_grad_norm: float = 1.0  # 0 disables clipping
    implementation: str = "auto"  # auto | fused | foreach | for-loop


@dataclass
class LoopConfig:
    """What every training loop shares: how long, how often to log and evaluate, where."""

    # Optimizer steps in total (a resumed run continues to this). Fine-tuning jobs may leave it
    # null to take it from their epochs; set, it stops them early.
    steps: int | None = 1000
    micro_batch: int = 1  # sequences (pairs for reward models) per rank per forward/backward
    seed: int = 0  # model initialisation and sampling (the data order has data.seed)
    log_every: int = 10
    eval_every: int = 200  # validation every N steps (0: only at the end)
    eval_batches: int = 20  # validation micro-batches per rank per evaluation (0: all)
    max_nonfinite_steps: int = 5  # abort after this many non-finite losses in a row
    device: str = "auto"  # auto | cpu | cuda
    peak_tflops: float | None = None  # per-device peak for MFU on devices not in the table
    wandb: bool = True  # log to wandb (offline unless logged in)
    wandb_project: str = "llama_dist"
    stop_after: int | None = None  # stop (with a checkpoint) after this step, e.g. for tests
    # A collective (all-reduce, barrier, ...) that waits longer fails the run, naming the ranks
    # that stopped answering where the backend can tell (gloo). Long enough for the slowest
    # step, evaluation or checkpoint save.
    collective_timeout_s: float = 600.0
    # Python's garbage collector is off in the step loop and collects every N steps on every
    # rank at once (a collection at a random moment on one rank stalls all the others); 0
    # leaves it automatic.
    gc_every: int = 100
    # Prepare the next step's batches in a background thread (pinned memory, copied to the
    # GPU on a side stream) while the current step runs.
    prefetch: bool = True
    # derived in validation:
    grad_accum: int = 0
    global_batch: int = 0  # sequences (pairs) per optimizer step


@dataclass
class TrainConfig(LoopConfig):
    """The loop of token-level training (pretraining, SFT): batches counted in tokens."""

    global_batch_tokens: int = 4_194_304  # tokens per optimizer step, over all ranks


@dataclass
class CheckpointConfig:
    folder: str = "checkpoints"  # relative to the run folder
    every: int = 500  # save every N steps (and at the end, and on SIGTERM)
    keep_last: int | None = 3  # older complete checkpoints are deleted
    async_save: bool = False
    resume: str = "auto"  # auto: the latest complete checkpoint of this run, if any | none
    # Weights to start from: a llama_dist checkpoint (e.g. a shorter-context run) or an HF Llama
    # folder, read shard by shard.
    init_from: str | None = None
    # When the newest checkpoint is damaged (a file missing or shorter than .metadata says, a
    # .metadata or JSON file that does not parse, a read that fails). error: stop, naming the
    # file and the newest intact earlier checkpoint | previous: rename the damaged folder
    # step-N.damaged-<time> (never deleted) and resume from that earlier one.
    on_damaged: str = "error"
    # Config keys whose change on resume is accepted although it changes what the step
    # counter or the data position means (data, sequence length, global batch, data seed, a
    # schedule that moves the learning rate at the resumed step: train/resume_check.py lists
    # them). Dotted keys as the error names them, e.g. [data.seq_len]; a key also covers the
    # keys below it (data.sources covers data.sources.helpful.paths).
    allow_changes: list[str] = field(default_factory=list)


@dataclass
class SampleConfig:
    """Text sampled from the final checkpoint, so a run shows what the model learned."""

    prompts: list[str] = field(default_factory=lambda: ["The "])  # []: no samples
    max_new_tokens: int = 64
    temperature: float = 0.8
    top_p: float = 0.95


@dataclass
class HarnessConfig:
    """lm-evaluation-harness tasks run on the model being trained (evaluation/periodic.py; the
    `eval` extra), at validation steps: logged as kind "harness" in metrics.jsonl (wandb:
    harness/TASK/METRIC) and plotted beside the loss in loss_curve.png. Needs `tokenizer`."""

    # Bundled task names (llama_dist_mc, llama_dist_gen, ...), task YAML paths, or tasks of the
    # installed lm-eval; []: none.
    tasks: list[str] = field(default_factory=list)
    # Steps between evaluations, a multiple of train.eval_every; 0: at every validation. The
    # first (step 0) and last step are always evaluated.
    every: int = 0
    limit: int | None = None  # documents per task; None: all
    num_fewshot: int | None = None  # None: each task's own
    batch_size: int = 8  # requests per forward on each data-parallel rank
    max_gen_toks: int = 64  # generation length when a task does not set one
    seed: int = 1234  # few-shot sampling and the harness's seeds (the run's RNG is kept)


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    harness: HarnessConfig = field(default_factory=HarnessConfig)
    tokenizer: str | None = None  # tokenizer.model: checks the vocabulary, decodes samples
    run_name: str = "pretrain"  # default run folder: runs/<run_name>


def _chat_prompts() -> list[str]:
    return ["Write a short poem about the sea.", "What is the capital of France?"]


@dataclass
class SFTJobConfig:
    """Supervised fine-tuning (llama2.md, "Supervised fine-tuning"): the model comes from
    `init_from`, its shape from the checkpoint's own config."""

    # A llama_dist checkpoint (step folder, or a run's checkpoints folder: its newest step)
    # or a Hugging Face Llama folder (config.json + safetensors), loaded sharded.
    init_from: str | None = None
    tokenizer: str | None = None  # tokenizer.model of the base model (required)
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=2e-5, warmup_steps=None, weight_decay=0.1)
    )
    # 64 rows of 4096 tokens per step; steps null = from epochs
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            steps=None, global_batch_tokens=64 * 4096, eval_every=100, log_every=1
        )
    )
    epochs: float = 2.0  # passes over the training samples (train.steps, if set, stops earlier)
    # How packed samples are kept apart: auto (flex on CUDA, sdpa elsewhere) | sdpa | flex
    attention: str = "auto"
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    sample: SampleConfig = field(default_factory=lambda: SampleConfig(prompts=_chat_prompts()))
    run_name: str = "sft"  # default run folder: runs/<run_name>


@dataclass
class RewardLossConfig:
    """The binary ranking loss with a margin by rating, plus the Safety RM's auxiliary term
    (llama2.md, "Reward models"; rlhf/ranking.py)."""

    margin: str = "none"  # none | small | large (the paper's Table 27) | custom
    custom_margins: dict[str, float] = field(default_factory=dict)  # rating -> margin
    safety_weight: float = 0.0  # weight of the safe/unsafe term (a Safety RM: e.g. 1.0)


@dataclass
class RewardTrainConfig(LoopConfig):
    """The reward-model loop: batches counted in preference pairs."""

    global_batch_pairs: int = 512  # pairs per optimizer step over all ranks (llama2.md)


@dataclass
class RewardJobConfig:
    """A Helpfulness or Safety reward model (llama2.md, "Reward models"): the backbone comes
    from `init_from` (a chat model), with a fresh scalar head."""

    # An SFT (or pretraining) checkpoint or a Hugging Face Llama folder; a reward-model
    # checkpoint continues with its own head.
    init_from: str | None = None
    tokenizer: str | None = None  # tokenizer.model of the base model (required)
    data: RewardDataConfig = field(default_factory=RewardDataConfig)
    loss: RewardLossConfig = field(default_factory=RewardLossConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    # lr null: 1e-5, or 5e-6 for models of 70B parameters and more; cosine to 10%; warmup 3%
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=None, warmup_steps=None, weight_decay=0.1)
    )
    train: RewardTrainConfig = field(
        default_factory=lambda: RewardTrainConfig(steps=None, eval_every=100, log_every=1)
    )
    epochs: float = 1.0  # the paper trains one epoch (more over-fits)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run_name: str = "reward"  # default run folder: runs/<run_name>


@dataclass
class ScorerConfig:
    """What ranks the samples (rlhf/scoring.py): rewards in (0, 1)."""

    kind: str = "reward_model"  # reward_model | safety_gated | word_share
    reward_model: str | None = None  # kind=reward_model: a reward-model checkpoint
    helpfulness_rm: str | None = None  # kind=safety_gated: both reward models
    safety_rm: str | None = None
    threshold: float = 0.15  # safety_gated: the Safety RM decides below this (llama2.md)
    words: list[str] = field(default_factory=list)  # kind=word_share: the target words
    micro_batch: int = 8  # sequences per scoring forward per rank
    max_len: int = 4096  # longer prompt + response keep bos and their end

    def validate(self) -> ScorerConfig:
        kinds = ("reward_model", "safety_gated", "word_share")
        if self.kind not in kinds:
            raise ValueError(f"scorer.kind={self.kind!r} must be one of {kinds}")
        needed = {
            "reward_model": ["reward_model"],
            "safety_gated": ["helpfulness_rm", "safety_rm"],
            "word_share": [],
        }[self.kind]
        for name in needed:
            if not getattr(self, name):
                raise ValueError(f"scorer.kind={self.kind} needs scorer.{name} (a checkpoint)")
        if self.kind == "word_share" and not self.words:
            raise ValueError("scorer.kind=word_share needs scorer.words=[...]")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"scorer.threshold={self.threshold} must be in (0, 1)")
        if self.micro_batch < 1 or self.max_len < 2:
            raise ValueError("scorer.micro_batch must be >= 1 and scorer.max_len >= 2")
        return self


@dataclass
class RSSamplingConfig:
    """How rejection sampling draws its candidates."""

    num_samples: int = 10  # K responses per prompt and temperature
    temperatures: list[float] = field(default_factory=lambda: [1.0])  # one curve each
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    prompts_per_batch: int = 4  # prompts per rank per generation call (K rows each)
    seed: int = 0

    def validate(self) -> RSSamplingConfig:
        if self.num_samples < 1 or self.prompts_per_batch < 1 or self.max_new_tokens < 1:
            raise ValueError(
                "sampling.num_samples, sampling.prompts_per_batch and sampling.max_new_tokens "
                "must be >= 1"
            )
        if not self.temperatures or any(t <= 0 for t in self.temperatures):
            raise ValueError(
                f"sampling.temperatures={self.temperatures} must be a non-empty list of "
                "positive temperatures (rejection sampling needs different samples)"
            )
        if not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError("sampling.top_p must be in (0, 1] and sampling.top_k >= 0")
        return self


def _rs_sft() -> SFTJobConfig:
    # One pass over the kept set, as a fine-tuning round (llama2.md: the SFT recipe).
    return SFTJobConfig(epochs=1.0, run_name="sft")


@dataclass
class RejectionSamplingJobConfig:
    """One iteration of rejection-sampling fine-tuning (llama2.md): sample K responses per
    prompt from `policy`, keep the best under `scorer` among them and the kept samples of
    earlier iterations, fine-tune `policy` on the kept set."""

    policy: str | None = None  # the checkpoint to sample from (and to fine-tune)
    tokenizer: str | None = None
    prompts: list[str] = field(default_factory=list)  # JSON / JSONL prompt files
    skip_invalid: bool = False
    iteration: int = 1  # pools with the kept sets of iterations 1..iteration-1 of this run
    pool: list[str] = field(default_factory=list)  # more kept.jsonl files to pool with
    sampling: RSSamplingConfig = field(default_factory=RSSamplingConfig)
    scorer: ScorerConfig = field(default_factory=ScorerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    device: str = "auto"  # auto | cpu | cuda
    collective_timeout_s: float = 600.0  # a collective that waits longer fails, naming ranks
    finetune: bool = True  # fine-tune on the kept set (the sft section; its layout is ours)
    sft: SFTJobConfig = field(default_factory=_rs_sft)
    run_name: str = "rejection-sampling"


@dataclass
class PPOConfig:
    """The PPO step (llama2.md, "PPO"): 512 prompts per iteration, minibatches of 64, one
    optimizer step per minibatch, clip 0.2."""

    batch_prompts: int = 512  # prompts (one response each) per iteration, over all ranks
    minibatch_prompts: int = 64  # one optimizer step of policy and value each
    epochs: int = 1  # passes over the iteration's rollouts
    clip: float = 0.2
    value_clip: float | None = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    beta: float | None = None  # KL coefficient; null: 0.01 (7B/13B) or 0.005 (34B/70B)
    max_new_tokens: int = 256
    temperature: float = 1.0  # sampling the rollouts (0: greedy, for checks)
    top_p: float = 1.0
    value_lr: float | None = None  # null: optim.lr

    def validate(self) -> PPOConfig:
        if self.batch_prompts < 1 or self.minibatch_prompts < 1 or self.epochs < 1:
            raise ValueError("ppo.batch_prompts, ppo.minibatch_prompts and ppo.epochs must be >= 1")
        if self.batch_prompts % self.minibatch_prompts:
            raise ValueError(
                f"ppo.batch_prompts={self.batch_prompts} is not a multiple of "
                f"ppo.minibatch_prompts={self.minibatch_prompts}"
            )
        if not 0 < self.clip < 1 or (self.value_clip is not None and self.value_clip <= 0):
            raise ValueError("ppo.clip must be in (0, 1) and ppo.value_clip > 0 or null")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ValueError("ppo.gamma and ppo.lam must be in [0, 1]")
        if self.beta is not None and self.beta < 0:
            raise ValueError(f"ppo.beta={self.beta} must be >= 0 or null")
        if self.max_new_tokens < 1 or self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(
                "ppo.max_new_tokens must be >= 1, ppo.temperature >= 0, ppo.top_p in (0, 1]"
            )
        return self


@dataclass
class PPOJobConfig:
    """PPO against the reward models (llama2.md, "PPO"): the policy from an SFT or
    rejection-sampling checkpoint, a frozen reference copy, a value model from a reward
    model, the scorer's reward models frozen."""

    policy: str | None = None
    tokenizer: str | None = None
    prompts: list[str] = field(default_factory=list)
    skip_invalid: bool = False
    valid_fraction: float = 0.05  # held-out prompts for early stopping
    value_from: str | None = None  # a reward-model checkpoint; null: the scorer's (helpful) RM
    scorer: ScorerConfig = field(default_factory=ScorerConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    iterations: int = 200  # llama2.md: 200-400
    # AdamW (0.9, 0.95, eps 1e-5), weight decay 0.1, clip 1.0, constant lr 1e-6 (llama2.md)
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=1e-6, warmup_steps=0, min_lr_ratio=1.0)
    )
    micro_batch: int = 4  # sequences per forward per rank
    eval_every: int = 10  # held-out reward every N iterations (0: never)
    patience: int = 3  # stop after this many evaluations without a better held-out reward
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(every=10))
    device: str = "auto"
    seed: int = 0
    wandb: bool = True
    wandb_project: str = "llama_dist"
    stop_after: int | None = None  # stop (with a checkpoint) after this iteration, for tests
    collective_timeout_s: float = 600.0  # a collective that waits longer fails, naming ranks
    run_name: str = "ppo"


@dataclass
class PromptGenerationConfig:
    """How a stage that answers a prompt set generates (context distillation, safety
    evaluation): the prompts go in fixed batches, each seeded by its first prompt, so the
    same prompts get the same answers whatever the number of ranks."""

    temperature: float = 0.6  # 0: greedy; 0.6 / top_p 0.9 are Meta's chat defaults
    top_p: float = 0.9
    top_k: int = 0
    max_new_tokens: int = 256
    prompts_per_batch: int = 8  # prompts per generation call (a batch is one rank's)
    seed: int = 0

    def validate(self, section: str) -> PromptGenerationConfig:
        if self.max_new_tokens < 1 or self.prompts_per_batch < 1:
            raise ValueError(
                f"{section}.max_new_tokens and {section}.prompts_per_batch must be >= 1"
            )
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(
                f"{section}.temperature must be >= 0 (0: greedy), {section}.top_p in (0, 1] "
                f"and {section}.top_k >= 0"
            )
        return self


@dataclass
class PrepromptConfig:
    """The safety pre-prompt (rlhf/context_distillation.py): "You are a A and B assistant."
    from `num_adjectives` of `adjectives`, drawn per prompt, then the answer template of the
    prompt's risk category."""

    adjectives: list[str] = field(default_factory=lambda: list(SAFETY_ADJECTIVES))
    num_adjectives: int = 2
    # risk category -> how to answer such a prompt; a prompt of another category is an error
    templates: dict[str, str] = field(default_factory=lambda: dict(ANSWER_TEMPLATES))
    use_templates: bool = True  # false: the adjective sentence only, whatever the category
    # system: the pre-prompt is the system message (before the prompt's own); prefix: it
    # opens the last user message
    placement: str = "system"
    seed: int = 0  # with the prompt's key, draws its adjectives

    def validate(self) -> PrepromptConfig:
        if self.placement not in PLACEMENTS:
            raise ValueError(f"preprompt.placement={self.placement!r} must be one of {PLACEMENTS}")
        if not 1 <= self.num_adjectives <= len(self.adjectives):
            raise ValueError(
                f"preprompt.num_adjectives={self.num_adjectives} must be in "
                f"1..{len(self.adjectives)} (the number of preprompt.adjectives)"
            )
        return self


def _cd_sampling() -> PromptGenerationConfig:
    return PromptGenerationConfig(temperature=0.6, top_p=0.9)


@dataclass
class ContextDistillationJobConfig:
    """Safety context distillation (llama2.md, "Safety context distillation"): the policy
    answers each safety-tagged prompt without and with a safety pre-prompt, the Safety RM
    keeps the pre-prompted answer where it scores higher, and the policy is fine-tuned on
    (prompt without the pre-prompt, kept answer)."""

    policy: str | None = None  # the checkpoint to sample from (and to fine-tune)
    tokenizer: str | None = None
    # JSON / JSONL prompt files: the safety_tagged prompts are distilled; the others are the
    # helpful prompts whose Helpfulness RM score is compared before and after fine-tuning
    prompts: list[str] = field(default_factory=list)
    skip_invalid: bool = False
    safety_rm: str | None = None  # a Safety RM checkpoint (required): the gate
    helpfulness_rm: str | None = None  # a Helpfulness RM: the helpful prompts' check (optional)
    preprompt: PrepromptConfig = field(default_factory=PrepromptConfig)
    sampling: PromptGenerationConfig = field(default_factory=_cd_sampling)
    micro_batch: int = 8  # sequences per reward-model forward per rank
    max_len: int = 4096  # longer prompt + response keep bos and their end when scored
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    device: str = "auto"  # auto | cpu | cuda
    collective_timeout_s: float = 600.0  # a collective that waits longer fails, naming ranks
    finetune: bool = True  # fine-tune on the kept set (the sft section; its layout is ours)
    sft: SFTJobConfig = field(default_factory=_rs_sft)
    run_name: str = "context-distillation"


@dataclass
class GattInstructionConfig:
    """How dialogs without an instruction get one (rlhf/instructions.sample_instruction): 1 to
    `max_constraints` constraints of different categories, each shortened with `short_prob`."""

    seed: int = 0
    max_constraints: int = 3
    short_prob: float = 0.5  # the paper shortens half of them
    require_check: bool = False  # at least one checkable rule per training instruction

    def validate(self) -> GattInstructionConfig:
        if self.max_constraints < 1:
            raise ValueError(f"instructions.max_constraints={self.max_constraints} must be >= 1")
        if not 0.0 <= self.short_prob <= 1.0:
            raise ValueError(f"instructions.short_prob={self.short_prob} must be in [0, 1]")
        return self


@dataclass
class SyntheticDialogsConfig:
    """The synthetic dialog task (data/gatt.write_synthetic_dialogs), used when `dialogs` is
    empty: "repeat: w1 w2" user turns, a start or end word as the instruction."""

    n: int = 256  # training dialogs
    turns: int = 10  # user messages per dialog
    words_per_turn: list[int] = field(default_factory=lambda: [2, 4])  # [lo, hi] repeated words
    seed: int = 0

    def validate(self) -> SyntheticDialogsConfig:
        if self.n < 1 or self.turns < 1:
            raise ValueError(f"synthetic.n={self.n} and synthetic.turns={self.turns} must be >= 1")
        lo_hi = list(self.words_per_turn)
        if len(lo_hi) != 2 or not 1 <= lo_hi[0] <= lo_hi[1]:
            raise ValueError(
                f"synthetic.words_per_turn={lo_hi} must be [lo, hi] with 1 <= lo <= hi"
            )
        return self


def _greedy(max_new_tokens: int) -> PromptGenerationConfig:
    return PromptGenerationConfig(temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens)


@dataclass
class GattEvalConfig:
    """The adherence evaluation (rlhf/gatt_eval.py, the paper's Table 30): each model talks
    through held-out dialogs, the instruction in the first turn only, every answer checked."""

    # JSON / JSONL dialog files (data/gatt.py layouts); empty: a synthetic set (seed `seed`)
    # with the synthetic task, or else the last `num_dialogs` of `dialogs`, held out
    dialogs: list[str] = field(default_factory=list)
    num_dialogs: int = 50
    num_turns: int = 20  # turns 1..num_turns (Table 30: up to 20)
    seed: int = 1000  # synthetic eval dialogs, and instructions drawn for eval dialogs
    sampling: PromptGenerationConfig = field(default_factory=lambda: _greedy(128))

    def validate(self) -> GattEvalConfig:
        if self.num_dialogs < 1 or self.num_turns < 1:
            raise ValueError(
                f"eval.num_dialogs={self.num_dialogs} and eval.num_turns={self.num_turns} "
                "must be >= 1"
            )
        self.sampling.validate("eval.sampling")
        return self


GATT_RESPONDERS = ("policy", "rule")


@dataclass
class GattJobConfig:
    """Ghost Attention (llama2.md, "Ghost Attention, GAtt"): the policy answers multi-turn
    dialogs with the instruction concatenated to every user turn, the samples keep it in the
    first turn only with the loss on the last turn, and the policy is fine-tuned on them; the
    adherence table before and after (train/gatt.py)."""

    policy: str | None = None  # the checkpoint to sample with (and to fine-tune)
    tokenizer: str | None = None
    # JSON / JSONL files of multi-turn dialogs ({"users": [...]} or SFT "messages", an
    # "instruction" optional); empty: the synthetic task, written into the run folder
    dialogs: list[str] = field(default_factory=list)
    synthetic: SyntheticDialogsConfig = field(default_factory=SyntheticDialogsConfig)
    instructions: GattInstructionConfig = field(default_factory=GattInstructionConfig)
    # policy: the assistant turns sampled by the policy through the generation engine (the
    # paper); rule: a rule that follows the instruction while it is in the turn
    # (data/gatt.RuleResponder), for the synthetic task where a small model cannot yet
    responder: str = "policy"
    num_turns: int = 8  # turns sampled per dialog at most (the augmented dialog grows fast)
    per_turn: bool = True  # one sample per turn (turn t trained with its history) | per dialog
    placement: str = "system"  # the instruction in the sample: system message | prefix
    sampling: PromptGenerationConfig = field(default_factory=_cd_sampling)
    # Also fine-tune on the same dialogs without GAtt (instruction in the first turn only,
    # every turn trained: data/gatt.write_baseline_data) into baseline/, and report it
    baseline: bool = False
    eval: GattEvalConfig = field(default_factory=GattEvalConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    device: str = "auto"  # auto | cpu | cuda
    collective_timeout_s: float = 600.0  # a collective that waits longer fails, naming ranks
    sft: SFTJobConfig = field(default_factory=_rs_sft)  # the fine-tuning (its layout is ours)
    run_name: str = "gatt"


def _eval_sampling() -> PromptGenerationConfig:
    # Greedy: every checkpoint answers the same prompts the same deterministic way.
    return PromptGenerationConfig(temperature=0.0, top_p=1.0)


@dataclass
class SafetyEvalJobConfig:
    """The safety evaluation (rlhf/safety_eval.py): each checkpoint answers the same prompts
    with the same sampling; per checkpoint and risk category, the violation rate and the mean
    helpfulness."""

    checkpoints: list[str] = field(default_factory=list)  # language-model checkpoints, in order
    names: list[str] = field(default_factory=list)  # one per checkpoint; empty: their paths
    tokenizer: str | None = None
    # JSON / JSONL prompt files: safety_tagged prompts (with a risk_category) and helpful ones
    prompts: list[str] = field(default_factory=list)
    skip_invalid: bool = False
    # The risk categories a prompt may name (another is an error: a typo would be a category)
    categories: list[str] = field(default_factory=lambda: list(ANSWER_TEMPLATES))
    safety_rm: str | None = None  # a Safety RM checkpoint (required)
    helpfulness_rm: str | None = None  # a Helpfulness RM checkpoint (required)
    # A rule that judges answers where one is known (synthetic: data.preference's rule);
    # none: a violation is a Safety RM score below safety_threshold
    judge: str = "none"
    safety_threshold: float = 0.5  # on the Safety RM's sigmoid score, when judge=none
    sampling: PromptGenerationConfig = field(default_factory=_eval_sampling)
    micro_batch: int = 8  # sequences per reward-model forward per rank
    max_len: int = 4096  # longer prompt + response keep bos and their end when scored
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    device: str = "auto"  # auto | cpu | cuda
    collective_timeout_s: float = 600.0  # a collective that waits longer fails, naming ranks
    run_name: str = "safety-eval"


@dataclass
class EvaluateJobConfig:
    """Harness evaluation of one checkpoint (evaluation/job.py, the `eval` extra): the tasks'
    results table (results.md, results.json) in the checkpoint's run folder."""

    checkpoint: str | None = None  # llama_dist checkpoint, folder of step-N ones, or HF folder
    tokenizer: str | None = None  # default: tokenizer.model inside the checkpoint folder
    # bundled task names, task YAML paths, or tasks of the installed lm-eval
    tasks: list[str] = field(default_factory=lambda: ["llama_dist_mc", "llama_dist_gen"])
    num_fewshot: int | None = None  # None: each task's own
    limit: int | None = None  # documents per task; None: all
    batch_size: int = 8  # requests per forward
    max_gen_toks: int = 256  # generation length when a task does not set one
    add_bos_token: bool = True  # llama_dist documents start with bos
    # Requests in the Llama 2 chat format, for SFT and RLHF checkpoints; system_instruction
    # becomes the system message.
    apply_chat_template: bool = False
    system_instruction: str | None = None
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "float32"  # float32 | bfloat16 | float16
    seed: int = 0
    # Under torchrun: the model sharded as in training, FSDP over the ranks tp and
    # dp_replicate leave, the requests split over the data-parallel ranks.
    tp: int = 1
    dp_replicate: int = 1
    collective_timeout_s: float = 1800.0  # a collective waiting longer fails the job
    out_dir: str | None = None  # default: <run folder>/eval/<step-N>
    run_name: str = "evaluate"


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="job_schema", node=JobConfig)
    cs.store(name="sft_schema", node=SFTJobConfig)
    cs.store(name="reward_schema", node=RewardJobConfig)
    cs.store(name="rejection_sampling_schema", node=RejectionSamplingJobConfig)
    cs.store(name="ppo_schema", node=PPOJobConfig)
    cs.store(name="context_distillation_schema", node=ContextDistillationJobConfig)
    cs.store(name="gatt_schema", node=GattJobConfig)
    cs.store(name="safety_eval_schema", node=SafetyEvalJobConfig)
    cs.store(name="evaluate_schema", node=EvaluateJobConfig)


def to_job_config(cfg: Any) -> JobConfig:
    """An OmegaConf config (from Hydra) as typed dataclasses; ValueError for a key the schema
    does not have (`config_keys.check_known_keys`)."""
    return to_typed_config(cfg)


def validate_job(cfg: JobConfig, world_size: int) -> LlamaConfig:
    """Check the whole job and fill derived values; returns the model config.

    Reads no files and needs no process group, so every rank runs it first; it fills the
    derived fields of `cfg` in place.
    """
    model = cfg.model.build()
    seq_len = cfg.data.seq_len
    cfg.data.validate()
    if model.max_seq_len < seq_len:
        model = model.replace(max_seq_len=seq_len)
    cfg.parallel.validate(world_size, model, seq_len=seq_len)

    validate_batch(cfg.train, seq_len=seq_len, dp=cfg.parallel.dp)
    # parallel.grad_sync=auto needs the accumulation and the device's memory.
    device_type = run_device_type(cfg.train.device)
    resolve_job_grad_sync(
        model, parallel=cfg.parallel, train=cfg.train, seq_len=seq_len, device_type=device_type
    )
    if cfg.train.steps is None:
        raise ValueError("train.steps must be set for pretraining (e.g. train.steps=1000)")
    validate_optim(cfg.optim, steps=cfg.train.steps, default_lr=PEAK_LR.get(cfg.model.preset, 3e-4))
    validate_sample(cfg.sample)
    validate_checkpoint(cfg.checkpoint)
    validate_harness(
        cfg.harness, eval_every=cfg.train.eval_every, tokenizer=cfg.tokenizer, model=model
    )
    return model


def validate_harness(
    h: HarnessConfig, *, eval_every: int, tokenizer: str | None, model: LlamaConfig
) -> None:
    """Check the periodic harness evaluation's settings (its task names are checked by
    `llama_dist.evaluation.task_configs`, which needs the eval extra)."""
    if not h.tasks:
        return
    if isinstance(h.tasks, str):
        raise ValueError(f"harness.tasks={h.tasks!r} must be a list, e.g. [llama_dist_mc]")
    if not tokenizer:
        raise ValueError(
            "harness.tasks needs the model's tokenizer to encode the tasks' text; set "
            "tokenizer=PATH/tokenizer.model"
        )
    for name in ("batch_size", "max_gen_toks"):
        if getattr(h, name) < 1:
            raise ValueError(f"harness.{name}={getattr(h, name)} must be >= 1")
    if h.limit is not None and h.limit < 1:
        raise ValueError(f"harness.limit={h.limit} must be >= 1 (or null: every document)")
    if h.max_gen_toks >= model.max_seq_len:
        raise ValueError(
            f"harness.max_gen_toks={h.max_gen_toks} leaves no room for a prompt in "
            f"max_seq_len={model.max_seq_len}; generate fewer tokens"
        )
    if h.num_fewshot is not None and h.num_fewshot < 0:
        raise ValueError(f"harness.num_fewshot={h.num_fewshot} must be >= 0 (or null)")
    if h.every < 0:
        raise ValueError(f"harness.every={h.every} must be >= 0 (0: at every validation)")
    if h.every and not eval_every:
        raise ValueError(
            f"harness.every={h.every} with train.eval_every=0 (validation at the end only): "
            "the harness runs at validation steps; set train.eval_every, or harness.every=0"
        )
    if h.every and h.every % eval_every:
        raise ValueError(
            f"harness.every={h.every} is not a multiple of train.eval_every={eval_every}: the "
            "harness runs at validation steps; use a multiple, or 0 for every validation"
        )


def validate_batch(t: TrainConfig, *, seq_len: int, dp: int) -> None:
    """Check the loop settings and fill train.global_batch and train.grad_accum."""
    if t.global_batch_tokens <= 0:
        raise ValueError(f"train.global_batch_tokens={t.global_batch_tokens} must be positive")
    if t.global_batch_tokens % seq_len:
        raise ValueError(
            f"train.global_batch_tokens={t.global_batch_tokens} is not a multiple of "
            f"data.seq_len={seq_len}; use a multiple such as "
            f"{max(1, t.global_batch_tokens // seq_len) * seq_len}"
        )
    validate_loop(
        t,
        global_batch=t.global_batch_tokens // seq_len,
        dp=dp,
        what="sequences (train.global_batch_tokens / data.seq_len)",
        fix="change global_batch_tokens or micro_batch",
    )


def validate_loop(t: LoopConfig, *, global_batch: int, dp: int, what: str, fix: str) -> None:
    """Check the settings every loop shares and fill train.global_batch (`global_batch`
    units: sequences, pairs) and train.grad_accum."""
    for name in ("micro_batch", "log_every"):
        if getattr(t, name) <= 0:
            raise ValueError(f"train.{name}={getattr(t, name)} must be positive")
    if t.steps is not None and t.steps <= 0:
        raise ValueError(f"train.steps={t.steps} must be positive")
    t.global_batch = global_batch
    per_step = t.micro_batch * dp
    if t.global_batch % per_step:
        raise ValueError(
            f"global batch of {t.global_batch} {what} is not divisible by train.micro_batch "
            f"({t.micro_batch}) x data-parallel size ({dp}); {fix}"
        )
    t.grad_accum = t.global_batch // per_step
    if t.device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"train.device={t.device!r} must be auto, cpu or cuda")
    if t.max_nonfinite_steps < 1:
        raise ValueError("train.max_nonfinite_steps must be >= 1")
    if t.gc_every < 0:
        raise ValueError(f"train.gc_every={t.gc_every} must be >= 0 (0: automatic collection)")
    check_collective_timeout(t.collective_timeout_s, "train.collective_timeout_s")


def check_collective_timeout(seconds: float, key: str) -> None:
    if not seconds > 0:
        raise ValueError(f"{key}={seconds} must be positive (seconds)")


def validate_optim(o: OptimConfig, *, steps: int, default_lr: float) -> None:
    """Check the optimizer settings for a run of `steps`; fills lr and warmup_steps."""
    if o.lr is None:
        o.lr = default_lr
    if not o.lr > 0:
        raise ValueError(f"optim.lr={o.lr} must be positive")
    if not 0 <= o.min_lr_ratio <= 1:
        raise ValueError(f"optim.min_lr_ratio={o.min_lr_ratio} must be in [0, 1]")
    if o.warmup_steps is None:
        o.warmup_steps = min(max(5, round(0.03 * steps)), steps - 1)
    if not 0 <= o.warmup_steps < steps:
        raise ValueError(
            f"optim.warmup_steps={o.warmup_steps} must be in [0, train.steps={steps}); "
            "lower the warmup for a short run"
        )


def validate_sample(sample: SampleConfig) -> None:
    if sample.max_new_tokens < 1 or sample.temperature < 0 or not 0 < sample.top_p <= 1:
        raise ValueError(
            "sample: max_new_tokens must be >= 1, temperature >= 0 and top_p in (0, 1]; got "
            f"{sample.max_new_tokens}, {sample.temperature}, {sample.top_p}"
        )


def validate_checkpoint(c: CheckpointConfig) -> None:
    if c.keep_last is not None and c.keep_last < 1:
        raise ValueError(f"checkpoint.keep_last={c.keep_last} must be >= 1 or null")
    if c.resume not in ("auto", "none"):
        raise ValueError(f"checkpoint.resume={c.resume!r} must be auto or none")
    if c.every <= 0:
        raise ValueError(f"checkpoint.every={c.every} must be positive")
    if c.on_damaged not in ("error", "previous"):
        raise ValueError(f"checkpoint.on_damaged={c.on_damaged!r} must be error or previous")
    bad = [key for key in c.allow_changes if not isinstance(key, str) or not key.strip(".")]
    if bad:
        raise ValueError(
            f"checkpoint.allow_changes={list(c.allow_changes)} holds {bad}; list dotted config "
            "keys such as data.seq_len"
        )


__all__ = [
    "ACConfig",
    "CheckpointConfig",
    "JobConfig",
    "ModelConfig",
    "LoopConfig",
    "OptimConfig",
    "RSSamplingConfig",
    "RejectionSamplingJobConfig",
    "RewardJobConfig",
    "RewardLossConfig",
    "RewardTrainConfig",
    "SFTJobConfig",
    "SampleConfig",
    "ScorerConfig",
    "TrainConfig",
    "register_configs",
    "to_job_config",
    "validate_job",
]
