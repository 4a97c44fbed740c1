"""sdlit: self-distillation with feedback, on PyTorch Lightning."""

__version__ = "0.1.0"
