from setuptools import setup

setup(
    name="mtp-engine",
    version="0.1.0",
    description="Triton kernels and an inference/training engine for multi-token-prediction LLMs",
    python_requires=">=3.10",
    # `kernels/` installs as `mtp_kernels`: the name `kernels` belongs to another PyPI package.
    package_dir={"mtp_kernels": "kernels", "mtp_engine": "mtp_engine"},
    packages=["mtp_kernels", "mtp_engine"],
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "sentencepiece>=0.1.99",
        "numpy",
    ],
    extras_require={"dev": ["pytest>=7", "pytest-benchmark>=4"]},
    entry_points={"console_scripts": ["mtp=mtp_engine.cli:main"]},
)
