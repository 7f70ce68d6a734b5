"""`--profile`: on one extra step of a trainer, backbone forward calls and positions per phase (forward hooks), host
syncs per phase (counted Tensor methods), and with torch.profiler the largest op input, the largest single
allocation per phase and the top ops by self CPU time."""

from collections import defaultdict

import torch

from trl_powerflow.compat import unwrap_peft


SYNC_METHODS = ["item", "tolist", "cpu", "__bool__", "nonzero"]


def start_profiler(trainer):
    rec = trainer.rec
    rec.profile = {"forwards": defaultdict(int), "tokens": defaultdict(int), "syncs": defaultdict(int), "shape": None}

    def phase():
        return rec.stack[-1] if rec.stack else "outside"

    # backbone forward calls per phase (policy and reference)
    handles = []
    for model in {id(m): m for m in [trainer.model, trainer.ref_model] if m is not None}.values():
        backbone = unwrap_peft(trainer.accelerator.unwrap_model(model)).base_model  # LlamaModel

        def hook(module, args, kwargs, _which=("reference" if model is trainer.ref_model else "policy")):
            ids = kwargs.get("input_ids", args[0] if args else None)
            kind = "prefill/full" if ids is None or ids.size(1) > 1 else "decode"
            rec.profile["forwards"][(phase(), _which, kind)] += 1
            if ids is not None:  # positions computed (padding included)
                rec.profile["tokens"][(phase(), _which, kind)] += ids.numel()

        handles.append(backbone.register_forward_pre_hook(hook, with_kwargs=True))

    # host syncs per phase
    originals = {}
    for method in SYNC_METHODS:
        original = getattr(torch.Tensor, method)
        originals[method] = original

        def counted(self, *a, _original=original, _method=method, **k):
            if rec.stack and not getattr(rec, "_in_count", False):
                rec._in_count = True
                try:
                    rec.profile["syncs"][(phase(), _method)] += 1
                    return _original(self, *a, **k)
                finally:
                    rec._in_count = False
            return _original(self, *a, **k)

        setattr(torch.Tensor, method, counted)

    prof = torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU]
        + ([torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else []),
        record_shapes=True,
        profile_memory=True,
    )
    prof.__enter__()
    return prof, handles, originals


def stop_profiler(trainer, state):
    prof, handles, originals = state
    prof.__exit__(None, None, None)
    for h in handles:
        h.remove()
    for method, original in originals.items():
        setattr(torch.Tensor, method, original)
    rec = trainer.rec
    vocab = trainer.accelerator.unwrap_model(trainer.model).config.vocab_size
    # Largest tensor with a vocabulary-wide last dimension, per phase (phase = innermost bench:: range around the op)
    ranges = []
    events = list(prof.events())
    for e in events:
        if e.name.startswith("bench::"):
            ranges.append((e.time_range.start, e.time_range.end, e.name[len("bench::") :]))

    def phase_of(t):
        best = None
        for start, end, name in ranges:
            if start <= t <= end and (best is None or start >= best[0]):
                best = (start, end, name)
        return best[2] if best else "outside"

    largest_input, largest_alloc = {}, {}
    for e in events:
        if e.name.startswith("bench::"):
            continue
        ph = None
        for shape in e.input_shapes or []:
            if isinstance(shape, list) and shape and all(isinstance(s, int) for s in shape):
                numel = 1
                for s in shape:
                    numel *= s
                ph = ph or phase_of(e.time_range.start)
                if numel > largest_input.get(ph, (0,))[0]:
                    largest_input[ph] = (numel, e.name, tuple(shape))
        allocated = getattr(e, "self_cpu_memory_usage", 0) or 0
        if allocated > 0:
            ph = ph or phase_of(e.time_range.start)
            if allocated > largest_alloc.get(ph, (0,))[0]:
                largest_alloc[ph] = (
                    allocated,
                    e.name,
                    tuple(tuple(x) if isinstance(x, list) else x for x in (e.input_shapes or [])),
                )
    rec.profile["largest_input"] = largest_input
    rec.profile["largest_alloc"] = largest_alloc
    rec.profile["vocab"] = vocab
    rec.profile["prompt_length"] = trainer._buffered_inputs[0]["prompt_ids"].size(1)
    rec.profile["top_ops"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
