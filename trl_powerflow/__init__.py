"""PowerFlow for TRL: fine-tune an LLM towards the α-power of its own distribution, without labels or rewards."""

from .callbacks import CollapseGuardCallback
from .config import PowerFlowConfig
from .log_z import LogZ
from .objective import PowerFlowLossOutput, powerflow_loss
from .trainer import PowerFlowTrainer


__version__ = "0.1.0"
__all__ = [
    "CollapseGuardCallback",
    "LogZ",
    "PowerFlowConfig",
    "PowerFlowLossOutput",
    "PowerFlowTrainer",
    "powerflow_loss",
]
