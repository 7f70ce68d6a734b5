"""
A run that is never lost or overwritten: [`RunGuardMixin`] gives any GRPO trainer what follows.

- One owner per output directory for the whole run (`output_dir_lock.py`).
- `run_identity` / `check_run_identity`: each checkpoint records the settings that change the result; resuming compares
  them and refuses a checkpoint of another run, naming the fields that differ.
- `save_generation_buffer` / `load_generation_buffer`: a checkpoint taken inside a generation batch carries the rest of
  that batch, so that the resumed run continues exactly.
- `last_complete_checkpoint`: Trainer resumes from the highest-numbered checkpoint, even one a crash left half-written
  (a state file missing or cut short); this takes the last one whose save finished.
- A run resumed at its last step takes no step (Trainer takes one more).
- `named_save_errors`: a save that fails for lack of space or permission says which directory and why.
"""

import contextlib
import errno
import json
import os
import re
import shutil

import torch
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import TrainerState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput
from transformers.utils import logging

from ._io import atomic_path
from .compat import unwrap_peft
from .output_dir_lock import output_dir_lock


logger = logging.get_logger(__name__)

RUN_IDENTITY_FILE = "powerflow_run.json"
GENERATION_BUFFER_FILE = "generation_batch_rank{rank}.pt"

# The settings of a run that change its result (`max_steps` is not one: raising it extends a finished run)
IDENTITY_FIELDS = (
    "alpha",
    "alpha_warmup_steps",
    "target_entropy_ratio",
    "target_entropy",
    "alpha_min",
    "alpha_max",
    "alpha_step_size",
    "length_normalization",
    "log_z_estimator",
    "log_z_conditioning",
    "log_z_hidden_size",
    "log_z_learning_rate",
    "log_z_init",
    "epsilon",
    "epsilon_high",
    "num_generations",
    "max_completion_length",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "steps_per_generation",
    "num_iterations",
    "learning_rate",
    "lr_scheduler_type",
    "weight_decay",
    "optim",
    "seed",
    "reward_weights",
)


class ResumeRefusedError(ValueError):
    """A checkpoint this run must not resume from."""


class SaveFailedError(OSError):
    """A save that failed for lack of space or permission, naming the directory."""


def run_identity(trainer) -> dict:
    """The settings of the trainer's run that change its result, the model and the training data's fingerprint."""
    args = trainer.args
    base = unwrap_peft(trainer.accelerator.unwrap_model(trainer.model))
    identity = {"model": getattr(base.config, "_name_or_path", None) or type(base).__name__}
    identity.update({name: getattr(args, name, None) for name in IDENTITY_FIELDS})
    identity["reward_funcs"] = list(trainer.reward_func_names)
    identity["train_dataset"] = getattr(trainer.train_dataset, "_fingerprint", None)
    return json.loads(json.dumps(identity, default=str))  # as it reads back from the file


def save_run_identity(identity: dict, checkpoint: str) -> None:
    with atomic_path(os.path.join(checkpoint, RUN_IDENTITY_FILE)) as tmp_path, open(tmp_path, "w") as f:
        json.dump(identity, f, indent=2)


def check_run_identity(identity: dict, checkpoint: str, ignore_mismatch: bool = False) -> None:
    """Refuses to resume from `checkpoint` when it was written by a run with other settings (unless forced)."""
    path = os.path.join(checkpoint, RUN_IDENTITY_FILE)
    if not os.path.isfile(path):
        logger.warning(f"{checkpoint} has no {RUN_IDENTITY_FILE}: cannot check that it belongs to this run.")
        return
    with open(path) as f:
        saved = json.load(f)
    differences = [
        f"{name} {saved.get(name)!r} -> {identity.get(name)!r}"
        for name in dict.fromkeys([*saved, *identity])
        if saved.get(name) != identity.get(name)
    ]
    if not differences:
        return
    message = f"{checkpoint} was written by a run with other settings: {', '.join(differences)}."
    if ignore_mismatch:
        logger.warning(f"{message} Resuming anyway (`resume_ignore_mismatch=True`).")
        return
    raise ResumeRefusedError(
        f"{message} Resume with the settings of that run, start this run in another output_dir, or set "
        "`resume_ignore_mismatch=True` (`--resume_ignore_mismatch`) to resume from it anyway."
    )


def save_generation_buffer(checkpoint: str, rank: int, step: int, batches: list[dict]) -> None:
    """The rest of the generation batch a checkpoint falls inside, with TRL's micro-step counter, for this process."""
    with atomic_path(os.path.join(checkpoint, GENERATION_BUFFER_FILE.format(rank=rank))) as tmp_path:
        torch.save({"step": step, "batches": batches}, tmp_path)


def load_generation_buffer(checkpoint: str, rank: int, device) -> tuple[int, list[dict]] | None:
    """`(step, batches)` saved by [`save_generation_buffer`], or `None` for a checkpoint at a generation boundary."""
    path = os.path.join(checkpoint, GENERATION_BUFFER_FILE.format(rank=rank))
    if not os.path.isfile(path):
        if os.path.isfile(os.path.join(checkpoint, GENERATION_BUFFER_FILE.format(rank=0))):
            raise FileNotFoundError(
                f"{checkpoint} falls inside a generation batch but holds none for process {rank}: resume it on the "
                "number of processes that wrote it."
            )
        return None
    saved = torch.load(path, map_location=device, weights_only=True)
    return saved["step"], saved["batches"]


def is_readable_json(path: str) -> bool:
    try:
        with open(path) as f:
            json.load(f)
    except (OSError, ValueError):
        return False
    return True


_SAVE_FAILURES = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
}


@contextlib.contextmanager
def named_save_errors(directory: str):
    """Re-raises a save that failed for lack of space or permission as an `OSError` naming `directory` and why."""
    try:
        yield
    except (OSError, RuntimeError) as error:
        cause = _SAVE_FAILURES.get(getattr(error, "errno", None))
        # torch's writer reports a full disk as "PytorchStreamWriter failed writing file ...: file write failed"
        if cause is None and "failed writing file" in str(error):
            cause = "a write failed (is the disk full?)"
        if cause is None:
            raise
        if getattr(error, "errno", None) not in (errno.EROFS, errno.EACCES):
            with contextlib.suppress(OSError):
                cause += f"; {shutil.disk_usage(os.path.dirname(directory) or '.').free / 2**30:.1f} GiB free there"
        raise SaveFailedError(
            getattr(error, "errno", None) or errno.EIO,
            f"Could not save {directory}: {cause} ({error}). The previous checkpoint is intact; free space or fix the "
            "permissions, then resume with `resume_from_checkpoint=True`.",
        ) from error


def is_complete_checkpoint(checkpoint: str, required_files: tuple[str, ...] = ()) -> bool:
    """
    Whether the save of `checkpoint` finished: its trainer state (written last) is there and parses, as does its run
    identity when there is one, and every file of `required_files` is there.
    """
    identity = os.path.join(checkpoint, RUN_IDENTITY_FILE)
    return (
        is_readable_json(os.path.join(checkpoint, TRAINER_STATE_NAME))
        and (not os.path.exists(identity) or is_readable_json(identity))
        and all(os.path.isfile(os.path.join(checkpoint, name)) for name in required_files)
    )


def last_complete_checkpoint(output_dir: str, required_files: tuple[str, ...] = ()) -> str | None:
    """The latest `checkpoint-N` in `output_dir` whose save finished (see [`is_complete_checkpoint`])."""
    if not os.path.isdir(output_dir):
        return None
    steps = sorted(
        (int(name.split("-")[-1]) for name in os.listdir(output_dir) if re.fullmatch(r"checkpoint-\d+", name)),
        reverse=True,
    )
    for step in steps:
        checkpoint = os.path.join(output_dir, f"checkpoint-{step}")
        if is_complete_checkpoint(checkpoint, required_files):
            return checkpoint
        logger.warning(f"Skipping {checkpoint}: its save did not finish (a state file is missing or cut short).")
    return None


class RunGuardMixin:
    """
    Run safety for a GRPO trainer: `class MyTrainer(RunGuardMixin, GRPOTrainer)`.

    `train` holds the output directory's lock; `resume_from_checkpoint=True` takes the last complete checkpoint; a
    checkpoint that is incomplete or was written by a run with other settings is refused (`resume_ignore_mismatch`
    forces it); a run resumed at its last step loads its model and takes no step. Checkpoints carry the run's identity
    and the rest of a generation batch they fall inside, and a save that fails for lack of space names the cause.

    A subclass with state of its own implements three hooks: `_run_state_files` (files a complete checkpoint holds),
    `_save_run_state` and `_load_run_state`.
    """

    def _run_state_files(self) -> tuple[str, ...]:
        return ()

    def _save_run_state(self, output_dir: str) -> None:
        pass

    def _load_run_state(self, checkpoint: str) -> None:
        pass

    def train(self, resume_from_checkpoint=None, trial=None, **kwargs):
        with output_dir_lock(self.args.output_dir):  # from the first step to the last save
            if resume_from_checkpoint is True:
                resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir, self._run_state_files())
                if resume_from_checkpoint is None:
                    raise ResumeRefusedError(
                        f"No complete checkpoint to resume from in {self.args.output_dir}: start without "
                        "`resume_from_checkpoint`, or point it at the directory of the run to resume."
                    )
            if resume_from_checkpoint:
                if not is_complete_checkpoint(resume_from_checkpoint):  # a missing state file: named on loading
                    raise ResumeRefusedError(
                        f"{resume_from_checkpoint} is incomplete (its save did not finish: a state file is missing "
                        "or cut short). Resume with `resume_from_checkpoint=True` to take the last complete one."
                    )
                ignore_mismatch = getattr(self.args, "resume_ignore_mismatch", False)
                check_run_identity(run_identity(self), resume_from_checkpoint, ignore_mismatch)
                finished = self._finished_run(resume_from_checkpoint)
                if finished is not None:
                    return finished
            return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)

    def _finished_run(self, checkpoint):
        """A checkpoint at the last step already: its model and state loaded, no step taken."""
        state = TrainerState.load_from_json(os.path.join(checkpoint, TRAINER_STATE_NAME))
        if self.args.max_steps > 0:
            max_steps = self.args.max_steps
        elif self.args.num_train_epochs == state.num_train_epochs:
            max_steps = state.max_steps
        else:  # another number of epochs: Trainer counts the steps anew
            return None
        if state.global_step < max_steps:
            return None
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:  # their weights load only inside Trainer's loop
            raise ResumeRefusedError(
                f"{checkpoint} is already at step {state.global_step} of max_steps={max_steps}: nothing to train. Its "
                "model is in that directory; raise `max_steps` to train further."
            )
        logger.warning(
            f"{checkpoint} is already at step {state.global_step} of max_steps={max_steps}: nothing to train, its "
            "model is loaded. Raise `max_steps` to train further."
        )
        self._load_from_checkpoint(checkpoint)
        self.state = state
        self._load_run_state(checkpoint)
        losses = [log["loss"] for log in state.log_history if "loss" in log]
        return TrainOutput(state.global_step, sum(losses) / max(len(losses), 1), {})

    def _save_checkpoint(self, model, trial):
        checkpoint = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        with named_save_errors(os.path.join(self._get_output_dir(trial=trial), checkpoint)):
            super()._save_checkpoint(model, trial)

    def _save_optimizer_and_scheduler(self, output_dir):
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            save_run_identity(run_identity(self), output_dir)
        self._save_run_state(output_dir)
        if self._step % (self.args.steps_per_generation * self.num_iterations):
            save_generation_buffer(output_dir, self.accelerator.process_index, self._step, self._buffered_inputs)

    def _load_optimizer_and_scheduler(self, checkpoint):
        # Called on resume by every backend (unlike `_load_from_checkpoint`, which DeepSpeed and FSDP bypass)
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        self._load_run_state(checkpoint)
        buffered = load_generation_buffer(checkpoint, self.accelerator.process_index, self.accelerator.device)
        if buffered is not None:  # inside a generation batch: go on with its other micro-batches, not a new one
            self._step, self._buffered_inputs = buffered
