"""sdlit: self-distillation with feedback, on PyTorch Lightning."""

import os

# PyTorch's CPU allocator puts tensors of 2 MiB and more on transparent huge pages when this is set; it reads the
# variable once, at its first allocation, so it is set here, before sdlit imports torch. Without it, the glibc heap
# holds on to the memory freed by the many differently sized temporaries of length-grouped scoring, and GRPO's step
# peaks at about twice the RSS (bench/step.py --ablations huge_pages; results/step_grpo.md).
# ``THP_MEM_ALLOC_ENABLE=0`` in the environment opts out. See docs/performance.md, "Memory: huge pages".
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__version__ = "0.1.0"
