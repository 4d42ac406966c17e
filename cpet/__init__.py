"""cpet: parameter-efficient tuning for compressed language models (CPET / CA-LoRA)."""

__version__ = "0.1.0"
