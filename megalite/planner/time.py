"""The analytic step-time model: a roofline per micro-batch, the pipeline bubble of the schedule,
and the collectives that do not overlap, each a named term in seconds.

**Compute.** One transformer block and the head run forward and backward once on fake tensors
(micro-batch 1, the run's sequence length, full width) under ``FlopCounterMode`` — its matmul
FLOPs — and a byte counter, the bytes every other op reads and writes (norms, RoPE, SwiGLU,
residual adds: memory-bound). Attention's QKᵀ and ·V are added analytically (4·b·s²·h forward,
twice that backward: the counter sees a fused SDPA kernel, or nothing for CPU's flash path).
Both scale linearly in the micro-batch and split evenly over TP. Each part takes
its roof — matmuls ``flops / (peak · efficiency)``, the other (memory-bound) kernels
``bytes / (HBM bandwidth · efficiency)``, added since they run one after another — with the
efficiency constants below named, not fitted. Recomputation adds its forward again (full:
the block with its two TP collectives, on the first ``model.recompute_layers`` of each chunk
when set; selective: core attention).

**Tensor parallelism**: per block two collectives forward (all-reduce, or all-gather +
reduce-scatter with SP: the same bytes) and two backward, on NVLink when the TP group fits in a
node; each column-parallel call's backward dX all-reduce (SP: reduce-scatter) overlaps that
call's dW matmuls (``tensor_parallel/layers.py``), so only what exceeds them is exposed
(``_tp_exposed``). **Pipeline**: (m + p − 1) micro-batch slots of which p − 1
are bubble (1F1B, GPipe), (p − 1)/v for interleaved, a third of 1F1B's for zb-h1 (Qi et al.:
(p−1)(T_F + T_B − T_W)); p2p sends are small and overlap. **Data parallelism / ZeRO**: the
step's gradient reduction (reduce-scatter + all-gather of parameters for ZeRO-1/2 = one
all-reduce's bytes; per micro-batch for ZeRO-2 ``shard`` and ZeRO-3, whose parameter
all-gathers also run twice per micro-batch) on the network when the dp group spans nodes;
bucketed reductions overlap the last micro-batch's backward (ZeRO-3: each micro-batch's),
so only the excess is exposed; the parameters' all-gather after the optimizer step (ZeRO-1/2;
ZeRO-3's first gather of a step) waits. **Optimizer**: AdamW reads and writes 36 bytes per owned
parameter (memory-bound); offloaded, 2 x PCIe copies and the host's update.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from megalite.config.schema import Config
from megalite.hardware import GPUSpec
from megalite.planner.memory import DTYPE_BYTES, stage_units

MATMUL_EFFICIENCY = 0.7  # bf16 GEMMs of LLM shapes reach ~65-75% of the dense peak (H100, A100)
ATTENTION_EFFICIENCY = 0.5  # flash-attention 2 forward + backward: ~50% of peak on H100
HBM_EFFICIENCY = 0.8  # elementwise kernels: ~80% of the datasheet bandwidth
COMM_EFFICIENCY = 0.8  # NCCL bus bandwidth against the link's
PCIE_GBS = 25.0  # offload: host <-> device copies per GPU (PCIe 4/5 x16, one way, achieved)
HOST_ADAM_GBS = 20.0  # offload: the CPU update's memory traffic per GPU's share of the host

COUNT_TOKENS = 256  # tokens of the fake forward + backward whose costs are counted
_BLOCK: Dict[str, Tuple[float, float, float, float]] = {}


def block_costs(args, seq_len: int, precision: str) -> Tuple[float, float, float, float]:
    """(block matmul FLOPs, block other-op bytes, head matmul FLOPs, head other-op bytes) of
    forward + backward of one sample at full width, counted on fake tensors at up to 256
    tokens and scaled to ``seq_len`` (both are linear in the tokens once attention's s² part
    is left to the analytic term). Cached."""
    key = repr((args, seq_len, precision))
    if key not in _BLOCK:
        counted = min(seq_len, COUNT_TOKENS)
        _BLOCK[key] = tuple(x * seq_len / counted for x in _count(args, counted, precision))
    return _BLOCK[key]


def _count(args, seq_len: int, precision: str) -> Tuple[float, float, float, float]:
    import dataclasses

    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    from megalite.models import DTYPES
    from megalite.models.bert import MLMHead
    from megalite.models.transformer import Block, Head

    dtype = DTYPES[precision]
    args = dataclasses.replace(args, kernels="torch", dropout=0.0)
    out = []
    default = torch.get_default_dtype()
    with FakeTensorMode():
        # bert: bidirectional blocks (the same matmuls; attention's s² part is analytic,
        # unhalved either way) and the MLM head, its dense + GELU + norm transform included
        head = MLMHead if args.is_encoder else Head
        for make in (lambda: Block(args), lambda: head(args)):
            torch.set_default_dtype(dtype)  # built in the run's dtype (.to cannot swap fakes)
            try:
                module = make()
            finally:
                torch.set_default_dtype(default)
            x = torch.randn(1, seq_len, args.hidden_size, dtype=dtype, requires_grad=True)
            counter, traffic = FlopCounterMode(display=False), _Bytes()
            with counter, traffic:
                y = module(x)
                y.float().sum().backward()
            flops = sum(v for op, v in counter.get_flop_counts().get("Global", {}).items()
                        if "attention" not in str(op))
            out += [float(flops), float(traffic.bytes)]
    return tuple(out)  # type: ignore[return-value]


class _Bytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes read and written by the ops that are not matmuls (views move nothing)."""
    MATMUL = ("mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product", "convolution")

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        name = func.__name__
        moves = any(isinstance(t, torch.Tensor) for t in outs)  # not prim.device & co.
        if moves and not any(m in name for m in self.MATMUL) and not _is_view(func):
            flat = list(args) + list((kwargs or {}).values()) + outs
            self.bytes += sum(t.numel() * t.element_size() for t in flat
                              if isinstance(t, torch.Tensor))
        return out


def _is_view(func) -> bool:
    schema = func._schema
    return any(a.alias_info is not None and not a.alias_info.is_write
               for a in schema.returns) or func.__name__.split(".")[0] in (
        "detach", "t", "_unsafe_view")


def _roofline(flops: float, nbytes: float, gpu: GPUSpec, precision: str) -> float:
    """Matmuls at the compute roof, the other ops at the bandwidth roof: they are different
    kernels run one after another, so their times add (each kernel's max(flops / peak,
    bytes / bandwidth) is its compute term for a matmul, its bytes term for the rest)."""
    return (flops / (gpu.peak_tflops(precision) * 1e12 * MATMUL_EFFICIENCY)
            + nbytes / (gpu.hbm_gbs * 1e9 * HBM_EFFICIENCY))


def _allreduce(nbytes: float, n: int, gbs: float) -> float:
    return 0.0 if n <= 1 else 2 * (n - 1) / n * nbytes / (gbs * 1e9 * COMM_EFFICIENCY)


def column_dw_flops(args, tokens: int) -> Tuple[float, float]:
    """dW matmul FLOPs of a block's two column-parallel calls over ``tokens`` tokens at full
    width — q,k,v and fc_in (SwiGLU: gate and up): 2 · tokens · in · out each."""
    h = args.hidden_size
    qkv = (args.num_heads + 2 * args.num_kv_heads) * args.head_dim
    fc_in = args.ffn_hidden_size * (2 if args.is_llama else 1)
    return 2.0 * tokens * h * qkv, 2.0 * tokens * h * fc_in


def _tp_collective(cfg: Config, args, gpu: GPUSpec, gpus_per_node: int) -> float:
    """Seconds of one all-reduce of a micro-batch's activations over the TP group (SP: an
    all-gather + reduce-scatter pair, the same bytes), on NVLink when the group fits a node."""
    p, t = cfg.parallel, cfg.train
    bw = gpu.intra_gbs if p.tp <= gpus_per_node else gpu.inter_gbs
    nbytes = t.micro_batch_size * cfg.data.seq_len * args.hidden_size * DTYPE_BYTES[t.precision]
    return _allreduce(nbytes, p.tp, bw)


def recomputed_fraction(cfg: Config) -> float:
    """The share of a stage's layers whose forward full recomputation runs again: all, or
    ``model.recompute_layers`` = k of each (virtual) chunk's."""
    m, p = cfg.model, cfg.parallel
    if m.recompute != "full":
        return 0.0
    per_chunk = m.num_layers / (p.pp * p.virtual_stages)
    return min(m.recompute_layers, per_chunk) / per_chunk if m.recompute_layers else 1.0


def _tp_exposed(cfg: Config, args, gpu: GPUSpec, gpus_per_node: int) -> float:
    """Seconds of one block's TP collectives (forward + backward of one micro-batch) that are
    not hidden. Forward: the two row-parallel all-reduces (SP: all-gather + reduce-scatter
    pairs, the same bytes) wait for their result. Backward: without SP the row-parallel side
    is the identity and each column-parallel call's dX all-reduce overlaps its own dW matmuls;
    with SP the row side's two all-gathers are exposed and each column call's reduce-scatter
    overlaps its dW. zb-h1 defers dW to the W pass, so nothing overlaps there."""
    p, t = cfg.parallel, cfg.train
    if p.tp <= 1:
        return 0.0
    tokens = t.micro_batch_size * cfg.data.seq_len
    coll = _tp_collective(cfg, args, gpu, gpus_per_node)
    overlapped = coll / 2 if p.sequence_parallel else coll  # reduce-scatter or all-reduce
    exposed = 2 * coll + (coll if p.sequence_parallel else 0.0)
    for flops in column_dw_flops(args, tokens):
        dw = 0.0 if p.schedule == "zb-h1" else _roofline(flops / p.tp, 0.0, gpu, t.precision)
        exposed += max(0.0, overlapped - dw)
    return exposed


def step_time(cfg: Config, args, gpu: GPUSpec, gpus_per_node: int,
              how: Optional[Dict[str, str]] = None) -> Dict[str, float]:
    """Named seconds of one optimizer step of ``cfg``'s layout, ``total`` their sum; ``how``,
    when given, receives each term's formula with its numbers (``megalite plan --explain``)."""
    p, t = cfg.parallel, cfg.train
    tp, pp, dp, v = p.tp, p.pp, p.dp, p.virtual_stages
    b, s, h = t.micro_batch_size, cfg.data.seq_len, args.hidden_size
    e = DTYPE_BYTES[t.precision]
    m = t.grad_accum
    blk_f, blk_b, head_f, head_b = block_costs(args, s, t.precision)
    layers = args.num_layers / pp  # per pipeline rank
    attn_fwd = 4.0 * b * s * s * h / tp
    full = recomputed_fraction(cfg) * layers  # layers whose forward runs again (full)
    selective = layers if cfg.model.recompute == "selective" else 0.0  # core attention again
    # one micro-batch through this rank's layers: matmuls + other ops (roofline), attention
    # (fwd + bwd = 3 forwards; a recomputed forward adds one)
    matmul = ((layers + full / 3) * blk_f + head_f) * b / tp
    other = ((layers + full / 3) * blk_b + head_b) * b / tp
    attn = (3 * layers + full + selective) * attn_fwd
    t_mb = (_roofline(matmul, other, gpu, t.precision)
            + attn / (gpu.peak_tflops(t.precision) * 1e12 * ATTENTION_EFFICIENCY))
    # a recomputed forward repeats its two row-parallel collectives (SP: and the gathers)
    coll, per_block = (_tp_collective(cfg, args, gpu, gpus_per_node),
                       _tp_exposed(cfg, args, gpu, gpus_per_node))
    tp_mb = layers * per_block + full * 2 * coll
    slot = t_mb + tp_mb
    bubble_slots = (pp - 1) * {"interleaved": 1 / v, "zb-h1": 1 / 3}.get(p.schedule, 1.0)
    out = {"compute (roofline, all micro-batches)": m * t_mb,
           "tensor-parallel collectives (exposed)": m * tp_mb,
           "pipeline bubble": bubble_slots * slot if pp > 1 else 0.0}
    # data parallelism / ZeRO over dp: inter-node once tp*dp spans more than a node
    dp_bw = gpu.intra_gbs if tp * dp <= gpus_per_node else gpu.inter_gbs
    params = sum(n for unit in stage_units(cfg, args, 0) for _, n in unit)
    g = DTYPE_BYTES[t.grad_dtype]
    sharded = p.zero_stage == 3 or (p.zero_stage == 2 and p.zero2_accumulate == "shard")
    half = _allreduce(params * g, dp, dp_bw) / 2  # one reduce-scatter (or all-gather)
    gather = _allreduce(params * e, dp, dp_bw) / 2
    backward_mb = t_mb * 2 / 3
    if p.zero_stage == 3:
        per_mb = half + gather * (2 if p.pp == 1 else 1)
        dp_time = m * max(0.0, per_mb - t_mb) + gather
    elif sharded:
        dp_time = m * max(0.0, half - backward_mb) + gather
    else:  # ZeRO-1/2's parameter all-gather follows the optimizer step (engine.publish)
        reduce = 2 * half if p.zero_stage == 0 else half
        dp_time = max(0.0, reduce - backward_mb) + (gather if p.zero_stage else 0.0)
    out["data-parallel / ZeRO collectives (exposed)"] = dp_time
    shard = params / (dp if p.zero_stage >= 1 else 1)
    if p.offload_optimizer:
        out["optimizer step (offloaded)"] = (shard * (4 + e) / (PCIE_GBS * 1e9)
                                             + shard * 36 / (HOST_ADAM_GBS * 1e9))
    else:
        out["optimizer step"] = shard * 36 / (gpu.hbm_gbs * 1e9 * HBM_EFFICIENCY)
    out["total"] = sum(out.values())
    if how is not None:
        peak = gpu.peak_tflops(t.precision)
        link = lambda gbs: f"{gbs:g} GB/s x {COMM_EFFICIENCY}"  # noqa: E731
        how["compute (roofline, all micro-batches)"] = (
            f"{m} micro-batches x ({matmul:.4g} matmul FLOP / ({peak:g} TFLOP/s x "
            f"{MATMUL_EFFICIENCY}) + {other:.4g} other-op bytes / "
            f"({gpu.hbm_gbs:g} GB/s x {HBM_EFFICIENCY}) + {attn:.4g} attention FLOP / "
            f"({peak:g} TFLOP/s x {ATTENTION_EFFICIENCY})) = {m} x {t_mb:.4g} s; "
            f"{layers:g} layers{f' + {full:g} recomputed' if full else ''}")
        if tp > 1:
            how["tensor-parallel collectives (exposed)"] = (
                f"{m} x ({layers:g} blocks x {per_block:.4g} s exposed"
                f"{f' + {full:g} recomputed x 2 collectives' if full else ''}); one collective "
                f"of {b * s * h * e / 2**20:.4g} MiB over tp {tp} at "
                f"{link(gpu.intra_gbs if tp <= gpus_per_node else gpu.inter_gbs)}: "
                f"{coll:.4g} s")
        if pp > 1:
            how["pipeline bubble"] = (f"{bubble_slots:.4g} slots (pp-1 = {pp - 1}"
                                      f"{' / v' if p.schedule == 'interleaved' else ''}"
                                      f"{' / 3' if p.schedule == 'zb-h1' else ''}) x "
                                      f"{slot:.4g} s per micro-batch slot")
        if dp > 1:
            rule = {0: f"gradient all-reduce {2 * half:.4g} s hides under the last "
                       f"micro-batch's backward ({backward_mb:.4g} s)",
                    3: f"per micro-batch a gradient reduce-scatter {half:.4g} s and "
                       f"{2 if pp == 1 else 1} parameter all-gather(s) of {gather:.4g} s hide "
                       f"under its forward + backward ({t_mb:.4g} s); the step's first "
                       "gather waits"}.get(p.zero_stage,
                f"gradient reduce-scatter {half:.4g} s hides under "
                f"{'each' if sharded else 'the last'} micro-batch's backward "
                f"({backward_mb:.4g} s); the parameter all-gather after the step "
                f"({gather:.4g} s) waits")
            how["data-parallel / ZeRO collectives (exposed)"] = (
                f"ZeRO-{p.zero_stage} over dp {dp} at {link(dp_bw)}: {rule}")
        how[next(k for k in out if k.startswith("optimizer step"))] = (
            f"{shard:.4g} owned parameters x 36 B of AdamW traffic"
            + (f" on the host ({HOST_ADAM_GBS:g} GB/s) + copies over PCIe ({PCIE_GBS:g} GB/s)"
               if p.offload_optimizer else f" / ({gpu.hbm_gbs:g} GB/s x {HBM_EFFICIENCY})"))
    return out
