"""Prefix sharing under DeepSpeed ZeRO-3: the step time of PowerFlow on two processes with and without it.

Two CPU processes (gloo) under TRL's `zero3.yaml`, the demo's shape: SmolLM2-135M-Instruct with LoRA r=16, 4 prompts
x 8 samples a step over both processes, completions forced to 12 tokens. Each setting is its own
`accelerate launch` (one after the other, the same steps); a step is timed on process 0 from `on_step_begin` to
`on_step_end`, the first `--warmup` steps left out. Under ZeRO-3 the processes decide together whether to share (every
model call gathers weights in collectives), so both share or neither does.

    python benchmarks/zero3_sharing.py --steps 8

Prints a table of median step times and their ratio, and appends it to `benchmarks/results/zero3_sharing_<date>.md`.
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


if not __package__:  # run as a script: import the package from the repository
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import common  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=4, help="measured steps per setting")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured first steps per setting")
    p.add_argument("--max_completion_length", type=int, default=12)
    p.add_argument("--worker", choices=["share", "noshare"], help=argparse.SUPPRESS)
    p.add_argument("--times_file", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def worker(args):
    """One setting, in each of the launched processes: train, and (process 0) write the step times."""
    common.setup_environment(threads=1)
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback

    from trl_powerflow import PowerFlowConfig, PowerFlowTrainer
    from trl_powerflow.models import resolve_model_name_or_path
    from trl_powerflow.prompt_sets import load_prompt_set

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            self.times.append(time.perf_counter() - self.start)

    path = resolve_model_name_or_path("smollm2-135m")
    dataset = load_prompt_set("capitals", split="train", kinds=["capital"]).select_columns(["prompt"])
    config = PowerFlowConfig(
        output_dir=tempfile.mkdtemp(prefix=f"zero3-{args.worker}-"),
        ddp_backend="gloo",
        bf16=False,
        per_device_train_batch_size=16,  # 2 prompts x 8 samples on each process
        num_generations=8,
        max_completion_length=args.max_completion_length,
        max_steps=args.warmup + args.steps,
        alpha=4.0,
        learning_rate=2e-4,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
        prefix_sharing=args.worker == "share",
    )
    peft_config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    times = StepTimes()
    trainer = PowerFlowTrainer(
        path,
        args=config,
        train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(path),
        peft_config=peft_config,
        callbacks=[times],
    )
    assert trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3
    # Every completion at full length, so that both settings do the same work
    trainer.generation_config.min_new_tokens = trainer.generation_kwargs["min_new_tokens"] = args.max_completion_length
    trainer.train()
    if trainer.accelerator.is_main_process:
        Path(args.times_file).write_text(json.dumps(times.times[args.warmup :]))


def launch(args, setting: str) -> list[float]:
    import trl

    zero3 = os.path.join(os.path.dirname(trl.__file__), "accelerate_configs", "zero3.yaml")
    times_file = os.path.join(tempfile.mkdtemp(prefix="zero3-times-"), "times.json")
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", zero3, "--num_processes", "2",
        "--mixed_precision", "no", os.path.abspath(__file__), "--worker", setting, "--times_file", times_file,
        "--steps", str(args.steps), "--warmup", str(args.warmup),
        "--max_completion_length", str(args.max_completion_length),
    ]  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    print(f"running {setting} ...", flush=True)
    subprocess.run(command, env=env, check=True)
    return json.loads(Path(times_file).read_text())


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    started = time.time()
    times = {setting: launch(args, setting) for setting in ("share", "noshare")}
    medians = {setting: statistics.median(values) for setting, values in times.items()}
    table = common.markdown_table(
        ["prefix sharing", "median step s", "steps"],
        [[setting, f"{medians[setting]:.2f}", str(len(times[setting]))] for setting in times],
    )
    ratio = medians["share"] / medians["noshare"]
    report = (
        f"{table}\n\nshared / not shared: **{ratio:.2f}x** (2 CPU processes, DeepSpeed ZeRO-3, demo shape; "
        f"{time.time() - started:.0f} s in all)\n"
    )
    print(report)
    out = common.RESULTS_DIR / f"zero3_sharing_{datetime.date.today()}.md"
    with open(out, "a") as f:
        f.write(f"```\n{common.command_line()}\n```\n\n{report}\n")
    print(f"appended to {out}")


if __name__ == "__main__":
    main()
