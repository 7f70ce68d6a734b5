"""The models, data and trainers step_cost.py compares: every trainer on the same model path, data, batch, completion
length, LoRA/full setting and seed, built with the timers of `timers.py`."""

import os
import time

from datasets import Dataset
from transformers import AutoTokenizer, PrinterCallback
from trl import GRPOConfig

from benchmarks.harness.timers import (
    StepRecorder,
    TimedGRPOTrainer,
    TimedPowerFlowTrainer,
    TimedSharedPrefixGRPOTrainer,
    TimedTRLOldLogpsPowerFlowTrainer,
    wrap_backward,
)
from trl_powerflow import PowerFlowConfig


def tiny_model_dir(args, root):
    """The tests' tiny Llama and word-level tokenizer (`trl_powerflow.testing`), saved so that every trainer loads a
    path."""
    from trl_powerflow.testing import make_model, make_tokenizer

    tokenizer = make_tokenizer()
    model = make_model(
        tokenizer,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        max_position_embeddings=max(64, args.max_completion_length + 16),
    )
    path = os.path.join(root, "tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def model_and_data(args, root):
    """`(model path, tokenizer, prompt dataset)` of `args.case`: the tiny model on two dummy prompts, or SmolLM2-135M
    on the capitals train split."""
    if args.case == "tiny":
        path = tiny_model_dir(args, root)
        dataset = Dataset.from_dict({"prompt": ["p0 a", "p1 b"] * 64})
    else:
        from trl_powerflow.models import resolve_model_name_or_path
        from trl_powerflow.prompt_sets import load_prompt_set

        path = resolve_model_name_or_path("smollm2-135m")
        dataset = load_prompt_set("capitals", split="train", kinds=["capital"]).select_columns(["prompt"])
    return path, AutoTokenizer.from_pretrained(path), dataset


def build_trainers(specs, args, root, device):
    """`{spec: trainer}` for the trainers named in `specs`, each built (and timed) on the case's model and data."""
    path, tokenizer, dataset = model_and_data(args, root)
    trainers = {}
    for spec in specs:
        start = time.perf_counter()
        trainers[spec] = build_trainer(spec, args, path, tokenizer, dataset, root, device)
        print(f"built {spec} in {time.perf_counter() - start:.1f}s", flush=True)
    return trainers


def build_trainer(spec, args, path, tokenizer, dataset, root, device):
    """One timed trainer: `spec` is powerflow, powerflow-noshare (prefix_sharing=False), powerflow-ni<N>
    (num_iterations N), powerflow-ni<N>-trl-old (the old policy's log-probs from TRL's extra forward), grpo-beta,
    grpo-nobeta or grpo-shared (GRPOTrainer with PrefixSharingMixin, beta as grpo-beta's)."""
    from peft import LoraConfig

    name = spec
    num_iterations = args.num_iterations
    trl_old = spec.endswith("-trl-old")
    prefix_sharing = spec != "powerflow-noshare"
    if spec == "powerflow-noshare":
        spec = "powerflow"
    if spec.startswith("powerflow-ni"):
        num_iterations = int(spec[len("powerflow-ni") :].removesuffix("-trl-old"))
        spec = "powerflow"
    extra_steps = 1 if args.profile else 0
    common = dict(
        output_dir=os.path.join(root, name),
        use_cpu=device == "cpu",
        bf16=device == "cuda",
        report_to="none",
        per_device_train_batch_size=args.per_device_train_batch_size,
        num_generations=args.num_generations,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        num_iterations=num_iterations,
        max_completion_length=args.max_completion_length,
        max_steps=args.warmup + args.rounds + extra_steps,
        logging_steps=1,
        save_strategy="no",
        learning_rate=args.learning_rate,
        disable_tqdm=True,
        seed=0,
        temperature=1.0,
        model_init_kwargs={"dtype": "bfloat16" if device == "cuda" else "float32"},
        dataloader_num_workers=0,
    )
    peft_config = None
    if args.case in ("smollm2-lora", "demo"):
        peft_config = LoraConfig(
            r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules="all-linear", task_type="CAUSAL_LM"
        )
    kwargs = dict(train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config)
    if spec == "powerflow":
        cls = TimedTRLOldLogpsPowerFlowTrainer if trl_old else TimedPowerFlowTrainer
        trainer = cls(path, args=PowerFlowConfig(prefix_sharing=prefix_sharing, **common), **kwargs)
    elif spec in ("grpo-beta", "grpo-nobeta", "grpo-shared"):
        beta = 0.0 if spec == "grpo-nobeta" else args.beta
        cls = TimedSharedPrefixGRPOTrainer if spec == "grpo-shared" else TimedGRPOTrainer
        trainer = cls(path, reward_funcs=constant_reward, args=GRPOConfig(beta=beta, **common), **kwargs)
    else:
        raise ValueError(f"unknown trainer {spec!r}")
    if args.force_length:
        # Every completion at full length, so that both trainers do the same work. PowerFlow's configuration refuses
        # `min_new_tokens` (it cuts the sampler's support): set on the trainer, for both alike
        length = args.max_completion_length
        trainer.generation_config.min_new_tokens = trainer.generation_kwargs["min_new_tokens"] = length
    trainer.remove_callback(PrinterCallback)  # the per-step log dicts would drown the report
    trainer.rec = StepRecorder()
    trainer.bench_name = name
    trainer.bench_num_iterations = num_iterations
    wrap_backward(trainer)
    return trainer


def constant_reward(completions, **kwargs):
    """GRPO's reward: 0.0 for every completion (PowerFlow runs unsupervised)."""
    return [0.0] * len(completions)
