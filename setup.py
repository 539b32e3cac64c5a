"""Packaging of neumf-trainer."""

import pathlib

from setuptools import find_packages, setup

HERE = pathlib.Path(__file__).parent

setup(
    name="neumf-trainer",
    version="0.1.0",
    description="Train, evaluate and export Neural Matrix Factorization recommenders with "
    "TensorFlow, from a laptop to multi-worker jobs.",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["trainer", "trainer.*"]),
    install_requires=[
        "tensorflow>=2.21,<2.22",
        "tensorboard>=2.21,<2.22",  # TF 2.21 no longer pulls it in; tf.summary needs it
        "keras>=3.15,<4",
        "tensorflow-datasets>=4.9.10,<4.10",
        "importlib_resources>=6",  # tensorflow-datasets 4.9.10 imports it without requiring it
        "absl-py>=2.1,<3",
        "google-cloud-storage>=2.18,<4",
        "numpy>=1.26,<3",
    ],
    extras_require={
        "test": [
            "pytest>=8,<10",
        ],
    },
    entry_points={
        "console_scripts": [
            "neumf-prepare=trainer.prepare:run",
            "neumf-train=trainer.task:run",
            "neumf-recommend=trainer.recommend:run",
        ],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: Apache Software License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
