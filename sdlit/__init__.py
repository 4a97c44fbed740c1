"""sdlit: self-distillation with feedback, on PyTorch Lightning."""

import os

# PyTorch's CPU allocator puts tensors of 2 MiB and more on transparent huge pages when this is set; it reads the
# variable once, at its first allocation, so it is set here, before sdlit imports torch. Without it, the glibc heap
# holds on to the memory freed by the many differently sized temporaries of length-grouped scoring: GRPO's step
# (64 rollouts, SmolLM2-135M, CPU; bench/step.py) peaked at 12,918 MiB RSS instead of 6,008 MiB.
# ``THP_MEM_ALLOC_ENABLE=0`` in the environment opts out. See README, "Memory".
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__version__ = "0.1.0"
