"""Typed configuration: one dataclass per section, a docstring under every field.

The docstrings are read back by ``megalite <cmd> --help`` (see ``load.field_docs``), so they are
the user-facing documentation of each option. Defaults describe a small CPU run; ``configs/*.yaml``
override them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional, Union


@dataclass
class ModelConfig:
    family: str = "gpt"
    """Architecture family: `gpt` (GPT-2: learned positions, LayerNorm, GELU, tied embeddings),
    `llama` (RMSNorm, RoPE, SwiGLU, grouped-query attention, untied head) or `bert` (the
    bidirectional encoder: segment embeddings, post-LayerNorm, exact GELU, a masked-LM head tied
    to the word embeddings; trained on masked-LM samples)."""
    num_layers: int = 2
    """Number of transformer blocks."""
    hidden_size: int = 64
    """Model width (d_model)."""
    num_heads: int = 4
    """Attention heads; must divide hidden_size."""
    num_kv_heads: Optional[int] = None
    """Key/value heads for grouped-query attention (llama); None means num_heads (plain MHA)."""
    ffn_hidden_size: Optional[int] = None
    """MLP inner width; None means 4*hidden_size (gpt) or LLaMA's 2/3*4*hidden rounded up to 256."""
    vocab_size: Optional[int] = None
    """Vocabulary size; None takes it from the data's tokenizer."""
    max_seq_len: int = 128
    """Longest sequence the model accepts (size of the learned position table for gpt)."""
    norm_eps: float = 1e-5
    """Epsilon of LayerNorm / RMSNorm."""
    rope_theta: float = 10000.0
    """RoPE base frequency (llama)."""
    rope_scaling: Optional[str] = None
    """LLaMA-3.x long-context RoPE scaling (llama), as `llama3:factor=8,low_freq_factor=1,
    high_freq_factor=4,original_max_position_embeddings=8192` (LLaMA-3.1's values; all four
    required). None: plain RoPE. Exported to and imported from HF's `rope_scaling`."""
    dropout: float = 0.0
    """Dropout probability on embeddings, attention probabilities and residual branches."""
    tie_embeddings: Optional[bool] = None
    """Share the input embedding with the output head; None means the family's default
    (gpt: true, llama: false)."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation; residual output projections are further
    scaled by 1/sqrt(2*num_layers) (GPT-2)."""
    kernels: str = "fused"
    """`fused`: LayerNorm/RMSNorm run megalite's fused kernels (csrc/, `megalite.ops`) where they
    are built, on CPU; on CUDA only once the GPU check has passed (or MEGALITE_CUDA_KERNELS=1),
    else PyTorch; so does attention's scaled masked softmax under data.reset_attention_mask
    (elsewhere, and with `torch`, attention is PyTorch's scaled_dot_product_attention, given
    the document mask as a boolean mask). `torch`: plain PyTorch ops everywhere. Same results
    within float rounding."""
    num_labels: int = 0
    """bert: 0 trains the masked-LM head; N > 0 puts a classifier over N classes on the pooled
    [CLS] token instead (`megalite finetune` sets it from the training file's labels)."""
    recompute: str = "none"
    """Activation recomputation (Korthikanti et al. 2022). `none`: keep every activation the
    backward needs. `selective`: re-run only core attention (QKᵀ, softmax, dropout, ·V) in the
    backward, dropping its s² tensors. `full`: each transformer block keeps only its input and
    is re-run inside its own backward (about one extra forward of compute). Exact: dropout replays
    its masks, so losses and gradients are bit-identical to `none` in every layout. The
    DeepSpeed JSON `activation_checkpointing` block does not turn it on (as in DeepSpeed)."""
    recompute_layers: int = 0
    """With model.recompute=full: recompute only the first k blocks of each pipeline stage (or
    virtual chunk), Megatron's `--recompute-method block`; 0 means every block."""


LLAMA3_ROPE_FIELDS = ("factor", "low_freq_factor", "high_freq_factor",
                      "original_max_position_embeddings")


def parse_rope_scaling(spec: Optional[str]) -> Optional[Dict[str, Any]]:
    """``model.rope_scaling`` -> the dict HF configs carry (None: plain RoPE). The spec is
    ``llama3:factor=8,low_freq_factor=1,high_freq_factor=4,original_max_position_embeddings=8192``
    (LLaMA-3.1's values); every field is required. Raises ValueError naming the field."""
    if spec is None or not str(spec).strip():
        return None
    kind, _, rest = str(spec).strip().partition(":")
    if kind != "llama3":
        raise ValueError(f"model.rope_scaling={spec!r}: type {kind!r} is not supported; use "
                         "llama3:factor=F,low_freq_factor=L,high_freq_factor=H,"
                         "original_max_position_embeddings=N")
    out: Dict[str, Any] = {"rope_type": "llama3"}
    for item in filter(None, (x.strip() for x in rest.split(","))):
        key, _, value = item.partition("=")
        if key not in LLAMA3_ROPE_FIELDS:
            raise ValueError(f"model.rope_scaling={spec!r}: unknown field {key!r}; the llama3 "
                             f"type takes {', '.join(LLAMA3_ROPE_FIELDS)}")
        try:
            out[key] = float(value)
        except ValueError:
            raise ValueError(f"model.rope_scaling={spec!r}: {key}={value!r} is not a number"
                             ) from None
    missing = [k for k in LLAMA3_ROPE_FIELDS if k not in out]
    if missing:
        raise ValueError(f"model.rope_scaling={spec!r}: missing {', '.join(missing)}")
    if not out["high_freq_factor"] > out["low_freq_factor"] > 0 or out["factor"] <= 0:
        raise ValueError(f"model.rope_scaling={spec!r}: needs factor > 0 and "
                         "high_freq_factor > low_freq_factor > 0")
    out["original_max_position_embeddings"] = int(out["original_max_position_embeddings"])
    return out


@dataclass
class ParallelConfig:
    dp: Union[int, Literal["auto"]] = "auto"
    """Data-parallel degree (replicas); world_size = dp * pp * tp. `auto` (Megatron's rule):
    under a launcher (torchrun, deepspeed, srun, mpirun, megalite launch) world_size / (tp * pp),
    an error when that does not divide; a bare run gets 1. A number that disagrees with the
    launcher's world size is an error."""
    tp: int = 1
    """Tensor-parallel degree (ranks sharing each layer; fastest-varying rank)."""
    pp: int = 1
    """Pipeline-parallel degree (stages)."""
    schedule: str = "1f1b"
    """Pipeline schedule (pp > 1): `gpipe` (all forwards, then all backwards), `1f1b`
    (PipeDream-Flush: at most pp micro-batches in flight), `interleaved` (1F1B over
    virtual_stages chunks per rank; grad_accum must be a multiple of pp) or `zb-h1` (zero-bubble
    H1: backward split into input-gradient and weight-gradient passes, weight passes fill the
    cool-down bubble)."""
    virtual_stages: int = 1
    """Model chunks per pipeline rank (v); v > 1 needs schedule=interleaved. Rank r holds the
    non-adjacent chunks r, r+pp, r+2pp, ..."""
    layers_per_stage: List[int] = field(default_factory=list)
    """Transformer layers of each (virtual) stage, pp*virtual_stages numbers summing to
    model.num_layers; empty splits them evenly (then pp*virtual_stages must divide num_layers).
    The embedding rides on the first stage, the final norm + head + loss on the last."""
    sequence_parallel: bool = False
    """With tp > 1: split LayerNorm/RMSNorm and dropout regions along the sequence, turning each
    tensor-parallel all-reduce into an all-gather + reduce-scatter (Korthikanti et al. 2022);
    activation memory of those regions drops by tp. data.seq_len must divide by tp."""
    vocab_multiple: int = 64
    """With tp > 1 the vocabulary is padded to a multiple of tp * vocab_multiple; padded rows get
    no probability mass and no gradient, so the loss equals the unpadded model's."""
    backend: str = "auto"
    """torch.distributed backend: `auto` (nccl with CUDA, else gloo; a job SLURM allocated GPUs
    stops on a node without CUDA instead of running on the CPU), `gloo` (CPU) or `nccl` (needs
    CUDA, else stops). With nccl each rank takes the GPU of its LOCAL_RANK, or under srun with
    per-task binding (--gpus-per-task, --gpu-bind) the first GPU it sees; more ranks on a node
    than visible GPUs stop the job before it starts."""
    bucket_mb: float = 25.0
    """Size of a gradient all-reduce bucket in MiB; a bucket is reduced as soon as all its
    gradients are ready, overlapping communication with the rest of backward."""
    timeout_s: float = 600.0
    """Collective timeout in seconds: a rank stuck longer than this in a collective raises."""
    zero_stage: int = 0
    """ZeRO sharding over the data-parallel group (Rajbhandari et al. 2020): 0 none (gradients
    all-reduced); 1 fp32 master weights and AdamW states sharded (gradients reduce-scattered,
    parameters all-gathered after the update: the same bytes as an all-reduce); 2 gradients
    sharded too; 3 parameters sharded too (each unit gathered for its forward and its backward,
    then freed). Works with tp and pp."""
    zero2_accumulate: str = "shard"
    """ZeRO-2 with grad_accum > 1: `shard` reduce-scatters every micro-batch's gradients into
    the owned fp32 shard (least memory) or `full` accumulates full gradients and
    reduce-scatters once per step (least traffic). ZeRO-3 always works as `shard`."""
    zero3_reshard_after_forward: str = "auto"
    """ZeRO-3: `true` frees a unit's gathered parameters after its forward and gathers them
    again for its backward (least memory); `false` keeps them gathered until the optimizer
    step, so micro-batches after the first gather nothing more; `auto` (torchtitan's default)
    is `true` without pipeline parallelism and `false` with it, where other micro-batches'
    forwards run between a unit's forward and its backward."""
    offload_optimizer: bool = False
    """ZeRO-Offload (Ren et al. 2021): fp32 master weights, AdamW moments and an fp32 gradient
    copy live in CPU buffers (pinned on GPU machines) and the update runs on the CPU."""


@dataclass
class TrainConfig:
    steps: int = 100
    """Number of optimizer steps."""
    micro_batch_size: Optional[int] = None
    """Samples per forward/backward on one data-parallel rank (DeepSpeed
    train_micro_batch_size_per_gpu). Any two of micro_batch_size, grad_accum, global_batch_size
    determine the third: global = micro * grad_accum * dp."""
    global_batch_size: Optional[int] = None
    """Samples per optimizer step over all replicas (DeepSpeed train_batch_size)."""
    grad_accum: Optional[int] = None
    """Micro-batches accumulated per step on each rank (DeepSpeed gradient_accumulation_steps)."""
    lr: float = 3e-4
    """Peak learning rate (reached at the end of warm-up)."""
    min_lr: float = 0.0
    """Learning rate at the end of decay."""
    lr_schedule: str = "cosine"
    """`cosine`, `linear`, `constant` or `wsd` (warm-up, stable, then linear decay over the last
    decay_fraction of the steps)."""
    warmup_steps: int = 0
    """Steps of warm-up from warmup_min_lr to lr."""
    warmup_type: str = "linear"
    """Shape of the warm-up: `linear` or `log` (the fraction of the way to lr grows as the log of
    the step, DeepSpeed's default)."""
    warmup_min_lr: float = 0.0
    """Learning rate the warm-up starts from (DeepSpeed warmup_min_lr)."""
    lr_schedule_style: str = "megalite"
    """`megalite`: warm-up step s (1-based) is s/warmup_steps of the way to lr, decay ends at
    min_lr on the last step. `deepspeed` (set by a --deepspeed_config with a scheduler block):
    step s uses the lr DeepSpeedEngine uses at its s-th optimizer step with WarmupLR (constant),
    WarmupDecayLR (linear) or WarmupCosineLR (cosine): its scheduler steps after each update, so
    steps 1-2 use warmup_min_lr (cosine: 0, then warmup_min_lr) and warm-up takes at least 2
    steps."""
    decay_fraction: float = 0.2
    """For lr_schedule=wsd: fraction of the steps spent decaying to min_lr at the end."""
    weight_decay: float = 0.1
    """AdamW weight decay (not applied to biases and norm weights)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    precision: str = "fp32"
    """`fp32`, `bf16` (bf16 parameters and compute, fp32 master weights in the optimizer) or
    `fp16` (as bf16, plus dynamic loss scaling: see loss_scale)."""
    grad_dtype: str = "fp32"
    """Dtype gradients are accumulated and all-reduced in: `fp32` (default) or `bf16`."""
    loss_scale: float = 0.0
    """fp16: a fixed loss scale, or 0 for dynamic scaling (DeepSpeed fp16.loss_scale). A step
    whose gradients overflow on any rank is skipped on every rank."""
    initial_loss_scale: float = 65536.0
    """fp16, dynamic: the starting scale (DeepSpeed 2**initial_scale_power)."""
    loss_scale_window: int = 1000
    """fp16, dynamic: double the scale after this many steps without overflow."""
    loss_scale_hysteresis: int = 2
    """fp16, dynamic: halve the scale at the this-many-th overflow since it last grew
    (DeepSpeed fp16.hysteresis; 1 halves at every overflow)."""
    min_loss_scale: float = 1.0
    """fp16, dynamic: the scale never drops below this."""
    seed: int = 1234
    """Seed of weight initialisation, data order and dropout; the same for every layout."""
    peak_tflops: float = 0.0
    """Peak dense TFLOP/s of one device, the denominator of the MFU figure; 0 looks the GPU up
    by name and precision in megalite/hardware.py (dense datasheet peaks, e.g. 989 for H100 SXM
    and H200 bf16; fp32 uses the TF32 peak only when torch enables TF32 matmuls). With 0 on a CPU
    or an unlisted GPU no MFU is reported."""
    eval_interval: int = 0
    """Evaluate validation loss every this many steps (0: only at the end)."""
    eval_iters: int = 10
    """Validation global batches per evaluation (the same samples for every layout)."""


@dataclass
class DataConfig:
    source: str = "stdlib"
    """`stdlib` (this Python's standard-library .py sources, prepared on first use; no download),
    `synthetic` (a small seeded corpus generated in code, identical on every machine; byte
    tokenizer, or data.tokenizer when it is `wordpiece:VOCAB`) or `prepared` (the datasets in `paths`, made by `megalite prepare-data` or
    Megatron-LM)."""
    paths: List[str] = field(default_factory=list)
    """Prefixes of prepared datasets (source=prepared): PREFIX.meta.json etc. made by `megalite
    prepare-data`, or Megatron-LM's PREFIX.bin + PREFIX.idx (IndexedDatasetBuilder), read in
    place; those carry no tokenizer, so data.tokenizer must name theirs."""
    weights: List[float] = field(default_factory=list)
    """Blending weights of `paths` (empty: proportional weights 1 each)."""
    tokenizer: str = "bpe:4096"
    """For source=stdlib: `bytes`, `bpe:VOCAB` (byte-level BPE trained on the corpus),
    `wordpiece:VOCAB` (BERT-style WordPiece trained on the corpus, cased, with [PAD] [UNK] [CLS]
    [SEP] [MASK] as ids 0-4 and [SEP] ending each document; also for source=synthetic) or the
    path of a Hugging Face tokenizer.json (a BERT one's [SEP] ends each document). Masked-LM
    needs [PAD] [CLS] [SEP] [MASK]: wordpiece or a BERT tokenizer.json. For Megatron datasets in
    `paths`: the path of the tokenizer.json they were made with (required). Ignored for
    megalite-prepared datasets."""
    stdlib_max_bytes: int = 4_000_000
    """For source=stdlib: byte budget of the corpus, so runs compare across machines."""
    cache_dir: str = ".cache/megalite"
    """Where source=stdlib keeps its prepared corpus (reused across runs)."""
    seq_len: int = 128
    """Tokens per training sample (documents are packed into samples of this length)."""
    split: str = "98,2"
    """Train/validation split of documents, as relative weights `train,val`."""
    num_workers: int = 2
    """Processes used to tokenize when preparing data."""
    reset_attention_mask: bool = False
    """Packed samples hold several documents, each ending with the tokenizer's end-of-document
    token (EOD). True: a token attends only to earlier tokens of its own document (block-diagonal
    causal mask; Megatron-LM --reset-attention-mask). False: to every earlier token."""
    reset_position_ids: bool = False
    """True: positions (GPT-2's learned positions, LLaMA's RoPE) restart at 0 after every EOD
    (Megatron-LM --reset-position-ids). False: 0..seq_len-1 across the packed sample."""
    eod_mask_loss: bool = False
    """True: no loss where the input token is EOD, i.e. on predicting a document's first token
    from the previous document (Megatron-LM --eod-mask-loss); the loss is averaged over the kept
    tokens of the global batch."""
    megatron_append_eod: bool = False
    """For a Megatron dataset in `paths` (PREFIX.bin + PREFIX.idx, as Megatron's --data-path):
    insert the tokenizer's end-of-document token after every document. Leave false for data
    made with `preprocess_data.py --append-eod`, whose documents already end with it."""


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None
    """Checkpoint directory; None means RUN_DIR/checkpoints."""
    interval: int = 0
    """Save every this many steps (0: only at the end and on SIGTERM/SIGUSR1)."""
    resume: bool = True
    """Resume from the `latest` checkpoint in `dir` when there is one, at any parallel layout
    (dp, tp, pp, ZeRO stage, offload) with the same model (another global batch continues by
    consumed samples, with a warning); false refuses a `dir` that already holds checkpoints
    (give the run its own run.dir)."""
    keep: int = 2
    """Keep this many most recent checkpoints written by this run (0 keeps all); checkpoints
    of other runs are never removed."""
    verify: str = "sizes"
    """What `train` checks of the checkpoint it resumes before any rank starts: "sizes" (every
    file's size against meta.json; each rank then reads only the CRC blocks of the stored
    tensors its layout needs and checks each against its CRC-32) or "full" (every byte of every
    file against its CRC-32, as `megalite checkpoint verify`)."""
    async_save: bool = False
    """Write checkpoints while training goes on: the save copies this rank's part to host
    memory, a writer thread (on its own gloo group, created at start-up) writes it; the next
    save, the end of training and a preemption wait for it."""
    init_from: Optional[str] = None
    """Start a new run from these weights (fresh optimizer, step 0), in any layout:
    `hf:DIR` (a Hugging Face model directory: config.json + safetensors, read without running
    any code) or a megalite checkpoint directory. The model section must describe the same
    model (a difference is named); ignored when the run resumes its own checkpoint."""


@dataclass
class RunConfig:
    dir: str = "runs/default"
    """Run directory of one run: resolved config.yaml, metrics.jsonl (a row per step; val_loss
    in the rows of evaluated steps and the last), TensorBoard events, checkpoints/. Only train
    writes here (eval and generate read); rerunning train resumes its latest checkpoint and
    first drops the metrics rows past it. Give each run its own; train refuses one it cannot
    write, or whose checkpoint is past train.steps."""
    log_interval: int = 10
    """Print a progress line every this many steps when stdout is not a terminal."""
    tensorboard: bool = True
    """Write TensorBoard event files when the tensorboard package is installed."""
    sample_tokens: int = 64
    """Tokens to generate as a sample at the end of training (0: none)."""
    sample_prompt: str = "def "
    """Prompt of the end-of-training sample."""


@dataclass
class FinetuneConfig:
    """Classification fine-tuning of an encoder on labelled JSON lines instead of the
    pre-training corpus (`megalite finetune` fills this section)."""

    train: Optional[str] = None
    """JSON-lines training file, one example per line (a text, an optional second text, an
    integer label); set, the run fine-tunes a classifier of model.num_labels classes (bert)."""
    eval: Optional[str] = None
    """JSON-lines evaluation file with the same fields: validation loss during training,
    accuracy and F1 after it."""
    task: Optional[str] = None
    """A GLUE task (cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli): its field names as the
    `datasets` library writes them; the *_field options override them."""
    text_field: Optional[str] = None
    """Field of the (first) text; default: the task's, else `text`."""
    text_pair_field: Optional[str] = None
    """Field of the second text of a pair task; default: the task's, else none."""
    label_field: Optional[str] = None
    """Field of the integer label; default `label`. Label -1 (GLUE's unlabeled test split) is
    refused for training."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    @property
    def world_size(self) -> int:
        """dp * tp * pp of a validated config (``validate`` resolves dp=auto to a number)."""
        dp = self.parallel.dp
        if not isinstance(dp, int):
            raise ValueError(f"parallel.dp={dp} is not resolved yet: validate the config first")
        return dp * self.parallel.tp * self.parallel.pp
