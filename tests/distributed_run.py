"""Train a tiny model for a few steps; launched by tests/test_distributed.py with 1 or 2 processes (torchrun), or
through `accelerate launch` with a DeepSpeed or FSDP configuration.

Usage: distributed_run.py OUTPUT_DIR PER_DEVICE_BATCH_SIZE {group,learned} [{cpu,gloo,cuda}] [resume] [noshare] [ga2]
       [nogather]

`cpu`: CPU processes, plain data parallelism. `gloo`: CPU processes under the engine of an accelerate configuration
(DeepSpeed), which accelerate sets up only without `use_cpu` and with the gloo backend named. `resume`: resume from
the checkpoint in OUTPUT_DIR. `noshare`: `prefix_sharing=False`. `ga2`: each step in two micro-batches of
PER_DEVICE_BATCH_SIZE rows. `nogather`: `ds3_gather_for_generation=False`. Every run saves a checkpoint at step 2 of
3, and writes, for each process, whether each scoring pass shared its prompts and, under ZeRO-3, how many weights were
gathered when the kept ones were freed, and after.
"""

import json
import os
import sys


sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
from conftest import make_config, make_model, make_tokenizer  # noqa: E402
from datasets import Dataset  # noqa: E402

import trl_powerflow.prefix_sharing  # noqa: E402
from trl_powerflow import PowerFlowTrainer  # noqa: E402
from trl_powerflow.cli.train import finish  # noqa: E402
from trl_powerflow.prefix_sharing import PrefixSharingMixin  # noqa: E402


def _record_shared_passes():
    """Whether each scoring pass shared its prompts, as it happens."""
    shared_passes = []
    shared_prefix_logps = trl_powerflow.prefix_sharing.shared_prefix_logps

    def recorded(*args, **kwargs):
        out = shared_prefix_logps(*args, **kwargs)
        shared_passes.append(out is not None)
        return out

    trl_powerflow.prefix_sharing.shared_prefix_logps = recorded
    return shared_passes


def _record_kept_weights():
    """Under ZeRO-3: (weights gathered, of all weights) when a shared pass's kept weights are freed, and after."""
    kept = []
    free = PrefixSharingMixin._free_kept_weights

    def recorded(self):
        parameters = [p for engine in self._engines_keeping_weights for p in engine.module.parameters()]
        gathered = lambda: sum(p.ds_status.name == "AVAILABLE" for p in parameters)  # noqa: E731
        before = gathered()
        free(self)
        if parameters:
            kept.append([before, gathered(), len(parameters)])

    PrefixSharingMixin._free_kept_weights = recorded
    return kept


def main(output_dir, per_device_batch_size, estimator, device="cpu", *flags):
    shared_passes = _record_shared_passes()
    kept_weights = _record_kept_weights()
    tokenizer = make_tokenizer()
    args = make_config(
        output_dir,
        use_cpu=device == "cpu",
        ddp_backend="gloo" if device == "gloo" else None,
        per_device_train_batch_size=per_device_batch_size,
        gradient_accumulation_steps=2 if "ga2" in flags else 1,
        num_generations=8,
        max_steps=3,
        save_strategy="steps",
        save_steps=2,
        learning_rate=1e-2,
        # SGD and a residual far from zero: Adam would turn float rounding in near-zero gradients into full steps
        optim="sgd",
        log_z_estimator=estimator,
        # The group run also adapts alpha to an entropy target: every process must keep the same alpha
        target_entropy_ratio=0.5 if estimator == "group" else None,
        alpha_step_size=0.5,
        log_z_init="zero",
        log_z_learning_rate=1e-2,
        prefix_sharing="noshare" not in flags,
        ds3_gather_for_generation="nogather" not in flags,
    )
    dataset = Dataset.from_dict({"prompt": ["p0", "p1", "p0 a", "p1 b", "a p0", "b p1"] * 4})
    trainer = PowerFlowTrainer(make_model(tokenizer), args=args, train_dataset=dataset, processing_class=tokenizer)
    # Greedy decoding, so that both runs see the same completions and only the training arithmetic is compared. The
    # configuration refuses it (no target can be learned from one completion per prompt): set on the trainer instead
    trainer.generation_config.do_sample = trainer.generation_kwargs["do_sample"] = False
    trainer.train(resume_from_checkpoint="resume" in flags or None)
    # The engine the policy trained under: FSDP2 shards parameters as DTensors
    parameter = next(trainer.model_wrapped.parameters())
    engine = (
        f"fsdp={trainer.is_fsdp_enabled} deepspeed={trainer.is_deepspeed_enabled} "
        f"processes={trainer.accelerator.num_processes} parameter={type(parameter).__name__}"
    )
    trainer.save_model()
    # Every process keeps its own copy of the log Z head: they must agree
    rank = trainer.accelerator.process_index
    if trainer.log_z is not None:
        torch.save(trainer.log_z.state_dict(), os.path.join(output_dir, f"log_z_rank{rank}.pt"))
    with open(os.path.join(output_dir, f"alpha_rank{rank}.json"), "w") as f:
        json.dump([log["powerflow/alpha"] for log in trainer.state.log_history if "powerflow/alpha" in log], f)
    with open(os.path.join(output_dir, f"engine_rank{rank}.txt"), "w") as f:
        f.write(engine)
    with open(os.path.join(output_dir, f"should_save_rank{rank}.txt"), "w") as f:
        f.write(str(trainer.args.should_save))
    with open(os.path.join(output_dir, f"shared_passes_rank{rank}.json"), "w") as f:
        json.dump(shared_passes, f)
    with open(os.path.join(output_dir, f"kept_weights_rank{rank}.json"), "w") as f:
        json.dump(kept_weights, f)
    finish(trainer)  # as `trl-powerflow train` ends a run


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], *sys.argv[4:])
