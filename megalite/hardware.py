"""What a device can do: the peak dense TFLOP/s the MFU figure divides by.

One table of GPUs by name and dtype (the planner reads it too). Every figure is the datasheet's
*dense* tensor-core peak per GPU: NVIDIA's Hopper/Ampere/Ada datasheets print the 2:4-sparse
figure first ("1,979 TFLOPS*", footnote "with sparsity"); the dense one is half of it. Training
runs dense matmuls, so an MFU over the sparse figure would be half the truth.

``fp32`` has two entries: plain FP32 (CUDA cores) and TF32 (tensor cores). An fp32 run is held
to the TF32 peak only when torch lets fp32 matmuls use TF32
(``torch.backends.cuda.matmul.allow_tf32`` or ``torch.set_float32_matmul_precision('high')``);
otherwise it runs at the FP32 peak. A device not in the table (and a CPU) has no known peak:
no MFU is reported unless ``train.peak_tflops`` gives one.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

# (pattern on torch.cuda.get_device_name(), {dtype: dense TFLOP/s}); first match wins, so a
# more specific name (H100 PCIe, H200 NVL) comes before the general one. "tf32" is the fp32
# peak with TF32 tensor cores; a GPU without bf16/tf32 (V100) has no such key.
PEAKS: List[Tuple[str, Dict[str, float]]] = [
    # NVIDIA H200 datasheet (H200 NVL column): BF16/FP16 1,671 sparse, TF32 835 sparse, FP32 60
    (r"\bH200 NVL\b", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    # NVIDIA H200 datasheet (H200 SXM column): BF16/FP16 1,979 sparse, TF32 989 sparse, FP32 67
    (r"\bH200\b", {"bf16": 989.0, "fp16": 989.0, "tf32": 494.5, "fp32": 67.0}),
    # NVIDIA H100 datasheet, H100 PCIe column: BF16/FP16 1,513 sparse, TF32 756 sparse, FP32 51
    (r"\bH100 PCIe\b", {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.0}),
    # NVIDIA H100 datasheet, H100 NVL column: BF16/FP16 1,671 sparse, TF32 835 sparse, FP32 60
    (r"\bH100 NVL\b", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    # NVIDIA H100 datasheet, H100 SXM column ("NVIDIA H100 80GB HBM3"): BF16/FP16 1,979
    # sparse, TF32 989 sparse, FP32 67
    (r"\bH100\b", {"bf16": 989.0, "fp16": 989.0, "tf32": 494.5, "fp32": 67.0}),
    # NVIDIA A100 datasheet (SXM and PCIe alike): BF16/FP16 312 dense (624 sparse), TF32 156
    # dense (312 sparse), FP32 19.5
    (r"\bA100\b", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    # NVIDIA A10 datasheet: BF16/FP16 125 dense (250 sparse), TF32 62.5 dense, FP32 31.2
    (r"\bA10\b", {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    # NVIDIA L40S datasheet: BF16/FP16 362.05 dense (733 sparse), TF32 183 dense, FP32 91.6
    (r"\bL40S\b", {"bf16": 362.05, "fp16": 362.05, "tf32": 183.0, "fp32": 91.6}),
    # NVIDIA L4 datasheet: BF16/FP16 121 dense (242 sparse), TF32 60 dense (120 sparse), FP32 30.3
    (r"\bL4\b", {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    # NVIDIA HGX B200 spec table, per GPU: FP16/BF16 4.5 PF sparse, TF32 2.2 PF sparse, FP32
    # 75 TF (read in a copy of NVIDIA's table, zdszero.github.io/.../Hardware.html; third-party
    # spec sites give the same 75.02 FP32). "GB200" does not match: no word boundary before B.
    (r"\bB200\b", {"bf16": 2250.0, "fp16": 2250.0, "tf32": 1100.0, "fp32": 75.0}),
    # NVIDIA V100 datasheet (SXM2): tensor (FP16) 125, FP32 15.7; no BF16, no TF32
    (r"\bV100-SXM", {"fp16": 125.0, "fp32": 15.7}),
    # NVIDIA V100 datasheet (PCIe): tensor (FP16) 112, FP32 14
    (r"\bV100", {"fp16": 112.0, "fp32": 14.0}),
]


def tf32_matmul_enabled() -> bool:
    """Whether fp32 matmuls on CUDA may run on TF32 tensor cores (torch's two switches)."""
    return bool(torch.backends.cuda.matmul.allow_tf32 or
                torch.get_float32_matmul_precision() != "highest")


def table_peaks(device_name: str) -> Dict[str, float]:
    """The PEAKS entry of the GPU called ``device_name`` ({} when unlisted)."""
    for pattern, peaks in PEAKS:
        if re.search(pattern, device_name):
            return peaks
    return {}


def dtype_peak(peaks: Dict[str, float], precision: str, tf32: bool) -> Optional[float]:
    """``precision``'s peak in ``peaks`` (`fp32`: the TF32 one when ``tf32`` and listed)."""
    if precision == "fp32" and tf32 and "tf32" in peaks:
        return peaks["tf32"]
    return peaks.get(precision)


def peak_tflops(device_name: str, precision: str, tf32: bool = False) -> Optional[float]:
    """Dense peak TFLOP/s of the GPU called ``device_name`` computing in ``precision``
    (`fp32`/`bf16`/`fp16`; `fp32` uses the TF32 peak when ``tf32``), or None when unknown."""
    return dtype_peak(table_peaks(device_name), precision, tf32)


def device_peak_tflops(device: torch.device, precision: str) -> Optional[float]:
    """The peak of ``device`` (None on a CPU or an unlisted GPU)."""
    if device.type != "cuda":
        return None
    return peak_tflops(torch.cuda.get_device_name(device), precision, tf32_matmul_enabled())


# ---- the planner's GPU presets (megalite plan --gpu NAME) -------------------------------------
@dataclass(frozen=True)
class GPUSpec:
    """What the planner's roofline and memory check need of one GPU. ``peaks``: dense TFLOP/s
    by dtype, as in PEAKS (a preset's is its PEAKS entry). Bandwidths are what a collective or
    kernel can use (GB/s, 1e9 bytes): ``intra`` the per-GPU NVLink bandwidth one way (datasheet
    total / 2), ``inter`` the per-GPU network bandwidth between nodes (one NIC per GPU);
    ``memory`` is the usable device memory in bytes."""
    name: str
    memory: int
    peaks: Dict[str, float]
    hbm_gbs: float
    intra_gbs: float
    inter_gbs: float

    def peak_tflops(self, precision: str) -> float:
        """The peak a run in ``precision`` computes at, by the trainer's MFU rule: fp32 at the
        TF32 peak only while torch's TF32 switches are on (``tf32_matmul_enabled``; the trainer
        leaves them at torch's default, off), else at the FP32 (CUDA-core) peak. ValueError
        naming the gap when the table has no such figure."""
        peak = dtype_peak(self.peaks, precision, tf32_matmul_enabled())
        if peak is None:
            raise ValueError(f"--gpu={self.name}: no {precision} peak known (megalite/hardware.py"
                             f" PEAKS); give a custom GPU with the five --gpu-* numbers")
        return peak


def preset(name: str, device_name: str, memory_gib: int, hbm_gbs: float, intra_gbs: float,
           inter_gbs: float) -> GPUSpec:
    """A preset whose peaks are PEAKS' entry for ``device_name`` (as torch names the GPU)."""
    peaks = table_peaks(device_name)
    assert peaks, device_name  # every preset has a PEAKS entry
    return GPUSpec(name, memory_gib * GIB, peaks, hbm_gbs, intra_gbs, inter_gbs)


GIB = 2**30
# Peaks from PEAKS above (the table the trainer's MFU divides by); HBM bandwidth from each
# datasheet; NVLink 600 GB/s (A100), 900 GB/s (H100, H200), 1.8 TB/s (B200) total per GPU; one
# 200 Gb/s HDR (A100) or 400 Gb/s NDR (H100 on) NIC per GPU. Memory: the capacity torch
# reports, rounded down to whole GiB (an "80GB" H100 shows 79.6 GiB).
GPU_SPECS: Dict[str, GPUSpec] = {s.name: s for s in [
    preset("a100-40gb", "NVIDIA A100-SXM4-40GB", 39, 1555.0, 300.0, 25.0),
    preset("a100-80gb", "NVIDIA A100-SXM4-80GB", 79, 2039.0, 300.0, 25.0),
    preset("h100-80gb", "NVIDIA H100 80GB HBM3", 79, 3350.0, 450.0, 50.0),
    preset("h200-141gb", "NVIDIA H200", 139, 4800.0, 450.0, 50.0),
    preset("b200", "NVIDIA B200", 178, 8000.0, 900.0, 50.0),
]}
