#!/usr/bin/env python
"""vild_d2: open-vocabulary detection by Vision and Language knowledge Distillation (ViLD).

detectron2 is not declared by name: it is not on the package registry. Install it as
README.md says (``make test`` / ``tools/setup_venv.sh`` do it for you).
"""
from setuptools import find_packages, setup

setup(
    name="vild_d2",
    version="0.1.0",
    description="ViLD open-vocabulary object detection as a detectron2 extension",
    packages=find_packages(include=["vild_d2", "vild_d2.*"]),
    package_data={
        "vild_d2.distill": ["csrc/*.c"],  # the crop kernel, compiled on first use (crop_kernel.py)
        "vild_d2.data": ["metadata/*.json"],  # the open-vocabulary class splits
        "vild_d2.teacher": ["prompts/*.txt"],  # the prompt sets (the official ViLD templates)
    },
    python_requires=">=3.9",
    install_requires=[
        "torch>=1.13",
        "torchvision>=0.14",
        "rf-clip==1.1",  # byte-identical copy of openai/CLIP's code, with its BPE vocabulary
        "ftfy",
        "regex",
        "fvcore>=0.1.5.post20221221",
        "iopath>=0.1.9",
        "pycocotools>=2.0.7",
        "opencv-python-headless",
        "tensorboard",
        "tqdm",
        "matplotlib",
        "Pillow",
        "numpy",
        "yacs",
        "termcolor",
        "tabulate",
        "cloudpickle",
        "omegaconf>=2.1",
        "hydra-core>=1.1",
        "packaging",
        "black",
        "setuptools>=77.0.3,<82",  # detectron2.model_zoo imports pkg_resources
    ],
    extras_require={"dev": ["pytest", "pytest-timeout"]},
)
