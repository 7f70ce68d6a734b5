"""PowerFlow for TRL: fine-tune an LLM towards the α-power of its own distribution, without labels or rewards."""

import logging


# At import, bitsandbytes tries to fetch an optional CPU kernel from the hub and warns when it cannot (offline, or no
# `kernels` package). 4-bit runs without it, so on CPU-only machines the warning is noise at every start.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from .callbacks import CollapseGuardCallback  # noqa: E402
from .config import PowerFlowConfig  # noqa: E402
from .log_z import LogZ  # noqa: E402
from .objective import PowerFlowLossOutput, powerflow_loss  # noqa: E402
from .prefix_sharing import PrefixSharingMixin, SharedPrefixGRPOTrainer  # noqa: E402
from .run_guard import RunGuardMixin  # noqa: E402
from .trainer import PowerFlowTrainer  # noqa: E402


__version__ = "0.1.0"
__all__ = [
    "CollapseGuardCallback",
    "LogZ",
    "PowerFlowConfig",
    "PowerFlowLossOutput",
    "PowerFlowTrainer",
    "PrefixSharingMixin",
    "RunGuardMixin",
    "SharedPrefixGRPOTrainer",
    "powerflow_loss",
]
