"""tunelab: decide whether to finetune, with numbers; then train, evaluate and ship."""

import logging
import os
import warnings

__version__ = "0.1.0"

# torch's CPU allocator aligns allocations of 2 MiB and more to huge pages and advises the kernel to back
# them with huge pages: 512x fewer page faults on the large, short-lived activations of a training step.
# Read once, at torch's first allocation, so it is set before anything imports torch (see tunelab.train.cpu).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

# Known-harmless noise from dependencies that would bury tunelab's own output.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "Failed to load CPU gemm_4bit_forward ..."
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*deprecated.*")
warnings.filterwarnings("ignore", message=".*torch_dtype.*is deprecated.*")
