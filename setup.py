from setuptools import setup

setup(
    name="mtp-engine",
    version="0.1.0",
    description="Triton kernels and an inference/training engine for multi-token-prediction LLMs",
    python_requires=">=3.10",
    # `kernels/` installs as `mtp_kernels`: the name `kernels` belongs to another PyPI package.
    package_dir={"mtp_kernels": "kernels", "mtp_engine": "mtp_engine"},
    packages=["mtp_kernels", "mtp_engine"],
    # The embedded default model (`mtp demo`, `mtp complete` without --ckpt-dir): 12 MB.
    package_data={"mtp_engine": ["default_model/*"]},
    # Floors by the APIs used (torch.distributed.fsdp.fully_shard: torch 2.6; programmatic launch's
    # gdc_wait: Triton 3.4); tested with torch 2.11 + Triton 3.6 (GPU) and torch 2.13 + Triton 3.9
    # (CPU). Without Triton (no wheel off Linux) everything runs on the PyTorch reference path.
    install_requires=[
        "torch>=2.6",
        "triton>=3.4; platform_system == 'Linux'",
        "sentencepiece>=0.1.99",
        "numpy",
    ],
    extras_require={"dev": ["pytest>=7", "pytest-benchmark>=4"]},
    entry_points={"console_scripts": ["mtp=mtp_engine.cli:main"]},
)
