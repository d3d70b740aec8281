"""Model FLOPs utilisation against a per-device peak.

MFU = achieved model FLOP/s / peak FLOP/s, where model FLOPs come from
`llama_dist.models.flops.flops_per_token` (no recomputation counted).
"""

from __future__ import annotations

# Dense (no sparsity) peak FLOP/s per device, by dtype. "bf16" also serves fp16.
# Vendor data sheets; H100 SXM and H200 share the same tensor cores.
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "a100": {"bf16": 312e12, "tf32": 156e12},
    "h100-sxm": {"bf16": 989e12, "tf32": 494.5e12},
    "h100-pcie": {"bf16": 756e12, "tf32": 378e12},
    "h100-nvl": {"bf16": 835e12, "tf32": 417.5e12},
    "h200": {"bf16": 989e12, "tf32": 494.5e12},
    "b200": {"bf16": 2250e12, "tf32": 1100e12},
    "gb200": {"bf16": 2500e12, "tf32": 1250e12},
    "l40s": {"bf16": 362e12, "tf32": 183e12},
    "mi300x": {"bf16": 1307e12, "tf32": 653.7e12},
}

# Substrings of torch.cuda.get_device_name() -> table key; the first match wins, so more
# specific names come first.
_DEVICE_NAME_PATTERNS: list[tuple[tuple[str, ...], str]] = [
    (("gb200",), "gb200"),
    (("b200",), "b200"),
    (("h200",), "h200"),
    (("h100", "pcie"), "h100-pcie"),
    (("h100", "nvl"), "h100-nvl"),
    (("h100",), "h100-sxm"),
    (("a100",), "a100"),
    (("l40s",), "l40s"),
    (("mi300x",), "mi300x"),
]


def device_key(device_name: str) -> str | None:
    """Table key for a device name such as 'NVIDIA H100 80GB HBM3', or None if unknown."""
    name = device_name.lower()
    if name in PEAK_FLOPS:
        return name
    for parts, key in _DEVICE_NAME_PATTERNS:
        if all(p in name for p in parts):
            return key
    return None


def peak_flops(device_name: str, *, dtype: str = "bf16", override: float | None = None) -> float:
    """Peak dense FLOP/s of one device. `override` (FLOP/s) wins; an unknown device is an error."""
    if override is not None:
        if not override > 0:
            raise ValueError(f"peak FLOP/s override {override} must be positive")
        return float(override)
    if dtype in ("fp16", "float16", "bfloat16"):
        dtype = "bf16"
    key = device_key(device_name)
    if key is None:
        raise ValueError(
            f"no peak FLOP/s known for device {device_name!r} (known: {sorted(PEAK_FLOPS)}); "
            "give the peak explicitly (train.peak_tflops=...) to compute MFU"
        )
    if dtype not in PEAK_FLOPS[key]:
        raise ValueError(
            f"no {dtype} peak known for {key}; known dtypes: {sorted(PEAK_FLOPS[key])}"
        )
    return PEAK_FLOPS[key][dtype]


def mfu(*, tokens_per_s: float, flops_per_token: float, num_devices: int, peak: float) -> float:
    """Fraction of the devices' peak achieved by the model FLOPs of `tokens_per_s` tokens."""
    if num_devices <= 0:
        raise ValueError(f"num_devices={num_devices} must be positive")
    return tokens_per_s * flops_per_token / (num_devices * peak)
