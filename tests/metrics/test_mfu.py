"""FLOPs per token and MFU, by ../shared/docs/llama2.md ("MFU convention")."""

from __future__ import annotations

import pytest

from llama_dist.metrics import mfu, peak_flops
from llama_dist.models import get_preset
from llama_dist.models.flops import flops_per_token


def test_flops_per_token_7b_by_the_convention():
    cfg = get_preset("7b")
    n, n_embedding = 6_738_415_616, 32_000 * 4096  # llama2.md presets table
    expected = 6 * (n - n_embedding) + 12 * 32 * 32 * 128 * 4096
    assert flops_per_token(cfg, 4096) == expected


def test_flops_grow_with_sequence_length_by_the_attention_term():
    cfg = get_preset("70b")
    delta = flops_per_token(cfg, 8192) - flops_per_token(cfg, 4096)
    assert delta == 12 * 80 * 64 * 128 * 4096


@pytest.mark.parametrize("preset,tok_per_s", [("7b", 3014), ("70b", 323)])
def test_llama2_implied_throughput_is_about_45_percent_mfu(preset, tok_per_s):
    # llama2.md: implied 3,014 (7B) and 323 (70B) tok/s/GPU = roughly 43-46% MFU on A100.
    value = mfu(
        tokens_per_s=tok_per_s,
        flops_per_token=flops_per_token(get_preset(preset), 4096),
        num_devices=1,
        peak=peak_flops("NVIDIA A100-SXM4-80GB"),
    )
    assert 0.43 <= value <= 0.47


@pytest.mark.parametrize(
    "name,peak",
    [
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A100 80GB PCIe", 312e12),
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA B200", 2250e12),
        ("h100-sxm", 989e12),
    ],
)
def test_peak_table(name, peak):
    assert peak_flops(name) == peak


def test_unknown_device_is_an_error_unless_peak_given():
    with pytest.raises(ValueError, match="no peak FLOP/s known for device 'cpu'.*peak_tflops"):
        peak_flops("cpu")
    assert peak_flops("cpu", override=1e12) == 1e12


def test_mfu_scales_with_devices():
    one = mfu(tokens_per_s=1000, flops_per_token=1e9, num_devices=1, peak=1e13)
    assert one == pytest.approx(0.1)
    assert mfu(tokens_per_s=1000, flops_per_token=1e9, num_devices=4, peak=1e13) == one / 4
