"""Packaging for oars-fast.

`kernels/` is installed as `oars_fast.kernels` (never as a top-level `kernels` module: a
PyPI package of that name exists and would shadow us or be shadowed); `configs/` ships inside the
package as `oars_fast.configs` (read through importlib.resources, so an installed `oars-fast demo`
finds its YAML files).
"""
from setuptools import find_packages, setup

packages = find_packages(include=["oars_fast", "oars_fast.*"]) + ["oars_fast.kernels", "oars_fast.configs"]

setup(
    name="oars-fast",
    version="0.1.0",
    description="Online RL alignment of generative 4x real-world super-resolution (OARS), fast",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"oars_fast.kernels": "kernels", "oars_fast.configs": "configs"},
    package_data={"oars_fast.configs": ["*/*.yaml"]},
    install_requires=[
        # torch is installed explicitly first by the Makefile (CPU wheel on CI machines).
        "torch>=2.4",
        "triton>=3.0",
        "diffusers>=0.35",
        "transformers>=4.51",
        "peft>=0.17",
        "accelerate>=1.0",
        "safetensors>=0.4",
        "deepspeed>=0.16",
        "numpy>=1.26",
        "pillow>=10.0",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "tensorboard>=2.16",
        "scikit-image>=0.22",
        "scikit-learn>=1.4",
        "scipy>=1.11",
        "matplotlib>=3.7",
    ],
    extras_require={
        "dali": ["nvidia-dali-cuda120"],
        "gpu": ["flash-attn"],
        "nr-iqa": ["pyiqa"],
        "dev": ["pytest>=8.0", "pytest-timeout>=2.3", "ruff>=0.6", "build>=1.0"],
    },
    entry_points={"console_scripts": ["oars-fast=oars_fast.cli:main"]},
)
