"""tunelab: decide whether to finetune, with numbers; then train, evaluate and ship."""

import warnings

__version__ = "0.1.0"

# No process settings here: the allocator environment is set when a CPU training run starts
# (tunelab.fast.start_cpu_run), and only if the user has not set it.

# Known-harmless deprecation warnings from dependencies that would bury tunelab's own output. Dependencies' log
# records (bitsandbytes' "Failed to load CPU gemm_4bit_forward ...") are the CLI's to hide: tunelab.cli._output.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*deprecated.*")
warnings.filterwarnings("ignore", message=".*torch_dtype.*is deprecated.*")
