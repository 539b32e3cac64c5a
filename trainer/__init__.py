"""neumf-trainer: train, evaluate and export Neural Matrix Factorization recommenders."""

__version__ = "0.1.0"
