"""Memory of a trainer: the process RSS and its peak (CPU; the peak counter reset at every step begin), and the bytes
of every tensor a trainer keeps between steps."""

import os

import torch


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def kept_bytes(trainer):
    """Bytes of every tensor the trainer keeps between steps: policy, separate reference, log Z, optimizer state."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen and t.numel() > 0:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()

    modules = [trainer.model, trainer.ref_model, getattr(trainer, "log_z", None)]
    for m in modules:
        if m is not None:
            for t in list(m.parameters()) + list(m.buffers()):
                add(t)
    if trainer.optimizer is not None:
        for state in trainer.optimizer.state.values():
            for t in state.values():
                add(t)
    return total
