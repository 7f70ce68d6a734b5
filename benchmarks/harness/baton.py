"""The round-robin baton: each trainer runs its own `train()` in its own thread, but only one thread runs at a time;
the baton callback lets a trainer do exactly one optimizer step, timed and with its memory peak, then hands the
baton to the next trainer."""

import threading
import time
import traceback
from collections import defaultdict

import torch
from transformers import TrainerCallback

from benchmarks.harness.memory import peak_rss_bytes, reset_peak_rss, rss_bytes
from benchmarks.harness.profiling import start_profiler, stop_profiler
from benchmarks.harness.timers import sync


class Baton:
    """Whose turn it is among `names` (round robin, skipping the finished ones)."""

    def __init__(self, names):
        self.names = list(names)
        self.turn = 0
        self.finished = set()
        self.cond = threading.Condition()

    def wait(self, name):
        with self.cond:
            self.cond.wait_for(lambda: self.names[self.turn] == name)

    def pass_on(self, name, finished=False):
        with self.cond:
            if finished:
                self.finished.add(name)
            if len(self.finished) == len(self.names):
                return
            i = self.names.index(name)
            for k in range(1, len(self.names) + 1):
                nxt = self.names[(i + k) % len(self.names)]
                if nxt not in self.finished:
                    self.turn = self.names.index(nxt)
                    break
            self.cond.notify_all()


class BatonCallback(TrainerCallback):
    """Waits for the baton before each step, times the step (wall and process CPU) and its memory peak into the
    trainer's `rec`, profiles it when it is `profile_step`, then passes the baton on."""

    def __init__(self, name, trainer, baton, args, profile_step):
        self.name, self.trainer, self.baton, self.args = name, trainer, baton, args
        self.profile_step = profile_step  # global step index (0-based) to profile, or None
        self.cuda = trainer.accelerator.device.type == "cuda"

    def on_train_begin(self, args, state, control, **kwargs):
        torch.set_num_threads(self.args.threads)
        self.baton.wait(self.name)

    def on_step_begin(self, args, state, control, **kwargs):
        rec = self.trainer.rec
        self.profiler = None
        if state.global_step == self.profile_step:
            self.profiler = start_profiler(self.trainer)
        sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.mem0 = torch.cuda.memory_allocated()
        else:
            reset_peak_rss()
            self.mem0 = rss_bytes()
        rec.current = {
            "phases": defaultdict(float),
            "cpu_phases": defaultdict(float),
            "scoring_calls": 0,
            "step": state.global_step,
            "profiled": self.profiler is not None,
        }
        self.t0, self.cpu0 = time.perf_counter(), time.process_time()

    def on_step_end(self, args, state, control, **kwargs):
        sync()
        total, cpu = time.perf_counter() - self.t0, time.process_time() - self.cpu0
        peak = (torch.cuda.max_memory_allocated() if self.cuda else peak_rss_bytes()) - self.mem0
        rec = self.trainer.rec
        rec.current.update(total=total, cpu=cpu, peak=peak)
        rec.steps.append(rec.current)
        if self.profiler is not None:
            stop_profiler(self.trainer, self.profiler)
        rec.current = None
        if state.global_step < args.max_steps:
            self.baton.pass_on(self.name)
            self.baton.wait(self.name)

    def on_train_end(self, args, state, control, **kwargs):
        self.baton.pass_on(self.name, finished=True)


def run_interleaved(trainers, args):
    """Trains every trainer of `trainers` (`{spec: trainer}`) in its own thread, one step at a time in turn, to the
    end. Returns the wall time in seconds; exits when a trainer failed (after the others finished)."""
    specs = list(trainers)
    baton = Baton(specs)
    errors = {}
    profile_step = args.warmup + args.rounds if args.profile else None
    for spec, trainer in trainers.items():
        trainer.add_callback(BatonCallback(spec, trainer, baton, args, profile_step))

    def run(spec):
        try:
            trainers[spec].train()
        except BaseException as e:  # noqa: BLE001
            errors[spec] = e
            traceback.print_exc()
            baton.pass_on(spec, finished=True)

    wall = time.perf_counter()
    threads = [threading.Thread(target=run, args=(spec,), name=spec) for spec in specs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - wall
    if errors:
        raise SystemExit(f"trainers failed: {list(errors)}")
    return wall
