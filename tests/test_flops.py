"""The benchmark's FLOPs arithmetic: GPU peaks by name, and the useful FLOPs of a LoRA training step."""
import pytest

from lora_course.flops import gpu_peak_tflops, training_flops
from lora_course.shapes import SMOLLM2_135M, ModelShape


def test_peak_flops_by_gpu_name():
    assert gpu_peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert gpu_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_peak_tflops("NVIDIA H200") == 989.4
    assert gpu_peak_tflops("Tesla T4") == 65.0
    assert gpu_peak_tflops("Radeon 780M") is None


def test_training_flops_counts_matmuls_lora_and_causal_attention():
    s = ModelShape("toy", hidden_size=4, intermediate_size=8, num_layers=2, num_heads=2, num_kv_heads=1,
                   vocab_size=10, head_dim=2)
    frozen = 2 * (4 * 4 + 4 * 2 + 4 * 2 + 4 * 4 + 3 * 4 * 8) + 10 * 4  # 2 layers of 7 linears + the head
    lora = s.lora_params(("q_proj",), 1)
    assert training_flops(s, [3, 5], r=1, targets=("q_proj",)) == \
        (4 * frozen + 6 * lora) * 8 + 6 * 2 * 4 * (9 + 25)
    # padding-free vs one padded row: quadratic attention makes one long sequence cost more than two short ones
    assert training_flops(SMOLLM2_135M, [512]) > training_flops(SMOLLM2_135M, [256, 256])
    with pytest.raises(ValueError, match="positive"):
        training_flops(s, [0])
