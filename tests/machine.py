"""Which CPU kernels this machine gives PyTorch: quoted by the tests of those paths and by the
suite's summary line, so a failure on another kind of machine says which path it took."""

from __future__ import annotations

import torch


def cpu_paths() -> str:
    """The kernels PyTorch picks on this CPU: its vector ISA, and whether bf16 matmuls are native
    (AVX-512 BF16 or AMX through oneDNN) or emulated. Tests of those paths quote this line."""
    features = [
        name
        for name, probe in (
            ("avx2", torch.cpu._is_avx2_supported),
            ("avx512", torch.cpu._is_avx512_supported),
            ("avx512_bf16", torch.cpu._is_avx512_bf16_supported),
            ("vnni", torch.cpu._is_vnni_supported),
            ("amx", torch.cpu._is_amx_tile_supported),
        )
        if probe()
    ]
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return (
        f"cpu: {torch.backends.cpu.get_cpu_capability()} kernels, features {' '.join(features) or 'none'}; "
        f"bf16 matmul {'native' if native else 'emulated'}; torch {torch.__version__}"
    )
