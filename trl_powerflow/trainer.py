"""PowerFlowTrainer: TRL's GRPOTrainer with the PowerFlow objective in place of GRPO's."""

import contextlib
import copy
import os
import textwrap
from functools import partial

import torch
from accelerate.utils import DistributedType, is_peft_model
from transformers.utils import logging
from trl import GRPOTrainer
from trl.trainer.utils import (
    get_config_model_id,
    split_pixel_values_by_grid,
    split_tensor_dict,
    unsplit_pixel_values_by_grid,
)

from .alpha import AlphaController
from .callbacks import repeated_ngram_rate
from .compat import check_bitsandbytes
from .config import PowerFlowConfig
from .data_checks import check_inputs
from .groups import prompt_groups, shuffle_groups
from .log_z import LOG_Z_FILE, LogZ, LogZOptimizerCallback, captured_prompt_features, prompt_feature_size
from .objective import group_mean, powerflow_loss
from .prefix_sharing import PrefixSharingMixin
from .rewards import check_reward_models, checked_reward_func
from .run_guard import RunGuardMixin
from .trl_seams import MULTIMODAL_INPUTS, attribute_set_to, no_reward, prepare_in_memory_base


logger = logging.get_logger(__name__)

_MAX_NON_FINITE_BATCHES = 8


class PowerFlowTrainer(RunGuardMixin, PrefixSharingMixin, GRPOTrainer):
    """
    Trainer for PowerFlow ([arXiv 2603.18363](https://arxiv.org/abs/2603.18363)): unsupervised fine-tuning that
    trains the model to sample from `p_base(y|x)^alpha`, the α-power of its own base distribution.

    A drop-in replacement for [`~trl.GRPOTrainer`]: it takes the same arguments and reuses GRPO's generation
    (transformers or vLLM), prompt handling, PEFT and quantisation, logging and checkpoints. It adds prefix sharing
    ([`PrefixSharingMixin`]: each prompt computed once for all of its samples) and run safety ([`RunGuardMixin`]: one
    run per output directory, checked and exact resume), and overrides:

    - `__init__`: the base model is TRL's reference model, always built (`beta` is a switch here, never a coefficient:
      no KL term); `reward_funcs` is optional; the log Z head (learned estimator) and the α controller are set up;
    - `_prepare_inputs`: a generation batch is shuffled by whole prompt groups, so that the group estimate of log Z'(x)
      sees every sample of a prompt, and the loss is a mean over the optimizer step's sequences;
    - `_calculate_rewards`: each reward function's output is checked where it is returned, naming the function;
    - `_generate_and_score_completions`: keeps the weighted sum of the rewards as ψ(y), the sequence-level term inside
      the α bracket of the target, in place of GRPO's advantages; with `num_iterations > 1` the old policy's log-probs
      come from the first optimisation pass, not an extra forward;
    - `_compute_loss`: [`powerflow_loss`], length-aware trajectory balance towards p_base^α. Tool and environment
      outputs (GRPO's `tool_mask`) are context, not the model's tokens: out of the loss and of |y|, while the base
      log-probs of the model's tokens are conditioned on them;
    - `save_model`: the learned log Z head is saved beside the model.

    The workarounds for TRL's internals are gathered, with their reasons, in `trl_seams.py`.

    Example:

    ```python
    from datasets import Dataset
    from trl_powerflow import PowerFlowConfig, PowerFlowTrainer

    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": "What is the capital of Peru?"}]] * 64})
    trainer = PowerFlowTrainer(
        model="HuggingFaceTB/SmolLM2-135M-Instruct",
        args=PowerFlowConfig(output_dir="smollm2-powerflow", alpha=4.0),
        train_dataset=dataset,
    )
    trainer.train()
    ```
    """

    _tag_names = ["trl", "powerflow", "gflownet"]
    _name = "PowerFlow"
    _paper = {
        "title": "PowerFlow: Unlocking the Dual Nature of LLMs via Principled Distribution Matching",
        "id": "2603.18363",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @article{powerflow2026,
                title        = {{PowerFlow: Unlocking the Dual Nature of LLMs via Principled Distribution Matching}},
                year         = 2026,
                eprint       = {arXiv:2603.18363},
            }"""),
    }

    def __init__(self, model, reward_funcs=None, args: PowerFlowConfig | None = None, **kwargs):
        if args is None:
            model_name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = PowerFlowConfig(f"{model_name.split('/')[-1]}-PowerFlow")
        elif not isinstance(args, PowerFlowConfig):
            raise TypeError(
                f"`args` must be a `PowerFlowConfig`, got `{type(args).__name__}`. Replace `GRPOConfig(...)` by "
                "`PowerFlowConfig(...)`: it accepts every GRPOConfig argument."
            )
        kwargs = check_inputs(model, args, kwargs)  # every prompt, before any model loads
        if isinstance(model, str):  # TRL loads it: refuse 4-bit/8-bit without bitsandbytes before it starts
            init_config = (args.model_init_kwargs or {}).get("quantization_config")
            check_bitsandbytes("`quantization_config`", kwargs.get("quantization_config"), init_config)

        # TRL rebuilds a full fine-tuning reference from `config._name_or_path`, which a model passed as an object may
        # lack or no longer match: freeze a copy of the object itself instead.
        in_memory_base = None
        if not isinstance(model, str) and kwargs.get("peft_config") is None and not is_peft_model(model):
            in_memory_base = copy.deepcopy(model).eval().requires_grad_(False)

        # TRL builds the reference and computes `ref_per_token_logps` only when beta != 0. PowerFlow always needs
        # them, as the base log-probs of its target; beta is a switch here, never a coefficient (no KL term).
        # GRPO refuses to start without a reward source; PowerFlow needs none, so hand it a placeholder and drop it,
        # keeping the reward an environment owns (its `get_reward`, which GRPO appends after the given functions)
        placeholder = not reward_funcs
        with attribute_set_to(args, "beta", 0.0 if in_memory_base is not None else 1.0):
            super().__init__(model, [no_reward] if placeholder else reward_funcs, args=args, **kwargs)
        self.beta = 1.0
        if placeholder:
            del self.reward_funcs[0], self.reward_func_names[0], self.reward_processing_classes[0]
            self.reward_weights = self.reward_weights[1:]
        if in_memory_base is not None:
            self.ref_model = prepare_in_memory_base(self, in_memory_base)
        if self._is_vlm and args.prefix_sharing:
            # Both passes take the images (GRPO's passes); a shared prefill would have to carry them too
            logger.warning("Prefix sharing is off for vision-language models: GRPO's generation and passes are used.")
            args.prefix_sharing = False
        if self.accelerator.num_processes > 1 and self.accelerator.distributed_type == DistributedType.NO:
            # accelerate's state for CPU processes without `use_cpu` (e.g. an FSDP configuration on a machine without
            # GPUs): nothing would average the gradients, each process would train a model of its own
            raise ValueError(
                f"{self.accelerator.num_processes} processes, but accelerate set up no distributed engine for them, "
                "so each process would train its own model. On CPU processes set `use_cpu=True` (`--use_cpu`) for "
                "data parallelism over gloo; FSDP needs GPUs."
            )

        self.log_z = None  # log_z_estimator="group": estimated in `_compute_loss`, nothing to learn or save
        if args.log_z_estimator == "learned":
            feature = None if args.log_z_conditioning == "scalar" else args.log_z_conditioning
            size = prompt_feature_size(self.accelerator.unwrap_model(self.model), feature) if feature else None
            # GRPO leaves a different seed on each process (for sampling): draw the head's init from the run's seed
            # so that every process starts from the same head
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(args.seed)
                self.log_z = LogZ(feature, size, args.log_z_hidden_size).to(self.accelerator.device)
            if args.log_z_init == "zero":
                self.log_z.start_at(0.0)
            self.log_z_optimizer = LogZOptimizerCallback.for_trainer(self, self.log_z)
            self.add_callback(self.log_z_optimizer)
        self.add_callback(
            AlphaController(
                args.alpha,
                warmup_steps=args.alpha_warmup_steps,
                target_entropy_ratio=args.target_entropy_ratio,
                target_entropy=args.target_entropy,
                alpha_min=args.alpha_min,
                alpha_max=args.alpha_max,
                step_size=args.alpha_step_size,
            )
        )
        self._non_finite_batches = 0

    def _prepare_inputs(self, generation_batch):
        if not self.model.training:
            return super()._prepare_inputs(generation_batch)
        # GRPO's, with one change: the generation batch is shuffled by whole prompt groups (see `groups.py`) before
        # it is cut into micro-batches, so that each micro-batch holds every sample of its prompts
        generate_every = self.args.steps_per_generation * self.num_iterations
        if self._step % generate_every == 0 or self._buffered_inputs is None:
            batch = split_pixel_values_by_grid(self._generate_and_score_completions(generation_batch))
            batch = shuffle_groups(batch, prompt_groups(batch["prompt_ids"], batch["prompt_mask"]))
            # The loss of an optimizer step is a mean over all of its sequences, as one big batch would take it, not a
            # mean of per-micro-batch means: count the scoreable sequences of a step's worth of micro-batches
            mask, base_logps = batch["completion_mask"], batch["ref_per_token_logps"]
            scoreable = (mask.sum(1) > 0) & torch.isfinite(torch.where(mask.bool(), base_logps, 0.0).sum(1))
            steps = self.args.steps_per_generation / self.args.gradient_accumulation_steps
            batch["sequences_in_step"] = scoreable.sum() / steps
            batches = split_tensor_dict(batch, self.args.steps_per_generation)
            self._buffered_inputs = [unsplit_pixel_values_by_grid(batch) for batch in batches]
        return self._buffered_inputs[self._step % self.args.steps_per_generation]

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        device = self.accelerator.device
        if not self.reward_funcs:  # fully unsupervised: skip GRPO's "every reward function returned None" warning
            return torch.zeros(len(prompts) * self.accelerator.num_processes, 0, device=device)
        # Each function's output is checked where it is returned, so that a bad value names its function; GRPO turns
        # None into NaN (the function does not apply to that sample) and warns when every function returned None
        checked = [
            func if isinstance(func, torch.nn.Module) else checked_reward_func(func, name, len(prompts))
            for func, name in zip(self.reward_funcs, self.reward_func_names, strict=True)
        ]
        with attribute_set_to(self, "reward_funcs", checked):
            rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        check_reward_models(rewards_per_func, self.reward_funcs, self.reward_func_names)
        # Gathered across processes; `_generate_and_score_completions` turns it into ψ
        self._rewards_per_func = rewards_per_func
        return rewards_per_func

    def _reuses_first_pass(self) -> bool:
        """
        With `num_iterations > 1`, TRL scores the samples once more (a no-grad forward) for the sampling policy's
        log-probs. When a generation batch is exactly one optimizer step, its first optimisation pass runs that very
        policy: `_compute_loss` keeps that pass's detached log-probs for the later passes instead. With vLLM too: it
        samples with the trained model's weights, and PowerFlow applies no vLLM importance-sampling ratio.
        """
        return self.num_iterations > 1 and self.args.steps_per_generation == self.args.gradient_accumulation_steps

    def _generate_and_score_completions(self, inputs):
        # TRL reads `num_iterations` here only to decide whether to run the old policy's forward
        reuse = self.model.training and self._reuses_first_pass()
        with attribute_set_to(self, "num_iterations", 1) if reuse else contextlib.nullcontext():
            output = super()._generate_and_score_completions(inputs)
        if self.reward_funcs:
            # GRPO turns the rewards into advantages, which PowerFlow does not use: keep their weighted sum ψ(y)
            rewards_per_func = self._rewards_per_func
            # ψ sums the functions that apply to a sample (GRPO's nansum): a sample none applies to gets ψ = 0
            psi = (rewards_per_func * self.reward_weights.to(rewards_per_func.device)).nansum(dim=1)
            num_local = output["completion_ids"].size(0)
            start = self.accelerator.process_index * num_local
            output["psi"] = psi[start : start + num_local]
        mode = "train" if self.model.training else "eval"
        if not self.reward_funcs:  # GRPO's reward statistics mean nothing without reward functions
            for name in ["reward", "reward_std", "frac_reward_zero_std"]:
                self._metrics[mode].pop(name, None)
        rates = [
            repeated_ngram_rate(ids[mask.bool()].tolist())
            for ids, mask in zip(output["completion_ids"].cpu(), output["completion_mask"].cpu(), strict=True)
        ]
        rates = [r for r in rates if r is not None]
        totals = torch.tensor([sum(rates), float(len(rates))], device=self.accelerator.device)
        totals = self.accelerator.reduce(totals, reduction="sum")
        if totals[1] > 0:  # no completion long enough to hold a repeated n-gram: nothing to report
            self._metrics[mode]["powerflow/repeated_ngram_rate"].append((totals[0] / totals[1]).item())
        return output

    def _compute_loss(self, model, inputs):
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        # The learned head's prompt features are read off this very pass (see `captured_prompt_features`)
        feature = self.log_z.feature if self.log_z is not None else None
        unwrapped = self.accelerator.unwrap_model(model)
        capture = captured_prompt_features(unwrapped, feature, prompt_ids, prompt_mask) if feature else None
        with capture or _no_features(prompt_ids) as prompt_features:
            policy_logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
                model,
                input_ids,
                attention_mask,
                completion_ids.size(1),
                compute_entropy=True,
                compute_aux_loss=self.aux_loss_enabled,
                **{key: inputs.get(key) for key in MULTIMODAL_INPUTS},
            )
        objective = partial(
            powerflow_loss,
            policy_logps=policy_logps,
            base_logps=inputs["ref_per_token_logps"],
            mask=mask,
            alpha=self.current_alpha(),
            psi=inputs.get("psi"),
            old_logps=inputs.get("old_per_token_logps"),
            epsilon_low=self.epsilon_low,
            epsilon_high=self.epsilon_high,
            length_normalization=self.args.length_normalization,
        )
        mode = "train" if self.model.training else "eval"
        groups = prompt_groups(prompt_ids, prompt_mask)
        if self.log_z is None:
            out = objective(log_z=None, groups=groups)
        else:
            out = objective(log_z=self.log_z_optimizer.log_z_for(objective, prompt_features(), mode == "train"))

        if mode == "train" and "old_per_token_logps" not in inputs and self._reuses_first_pass():
            inputs["old_per_token_logps"] = policy_logps.detach()  # the buffered micro-batch: later passes see them
        if mode == "train":  # a mean over the step's sequences (TRL expects the loss already scaled for GA)
            loss = out.loss.sum() / inputs["sequences_in_step"].clamp(min=1)
        else:
            loss = out.loss.sum() / out.valid.sum().clamp(min=1)
        if self.aux_loss_enabled:  # a MoE router's load-balancing loss, added and logged as GRPO does
            normalizer = self.current_gradient_accumulation_steps if mode == "train" else 1.0
            loss = loss + self.router_aux_loss_coef * aux_loss / normalizer
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())
        sums = self._log_metrics(out, entropies, mask, groups, mode)
        if mode == "train":
            self._after_training_batch(sums)
        return loss

    @property
    def alpha_controller(self) -> AlphaController:
        # Looked up, not kept: with `restore_callback_states_from_checkpoint`, Trainer replaces the instance on resume
        return next(cb for cb in self.callback_handler.callbacks if isinstance(cb, AlphaController))

    def current_alpha(self) -> float:
        """α at this optimizer step (fixed, warming up, or entropy-targeted: see [`AlphaController`])."""
        return self.alpha_controller.alpha(self.state.global_step)

    def _log_metrics(self, out, entropies, mask, groups, mode):
        """Logs means over the valid sequences of all processes (one reduction); returns the summed counts."""
        valid = out.valid.float()
        per_sequence = out.per_sequence_metrics()
        if self.log_z is not None:
            # The head's distance to each prompt's own target, the value the group estimate would take: on-policy,
            # the weighted mean residual of the prompt's samples (zero for the group estimate, so not logged there)
            gap = group_mean(out.residual.detach(), out.importance_weight, groups)
            per_sequence["log_z_gap"] = torch.where(out.valid, gap.abs(), 0.0)
        counts = {
            "entropy": (entropies.detach() * mask).sum(),
            "tokens": mask.sum(),
            "valid": valid.sum(),
            "non_finite": ((out.lengths > 0) & ~out.valid).float().sum(),  # non-finite residual or importance weight
        }
        sums = torch.stack([v.sum() for v in per_sequence.values()] + list(counts.values()))
        sums = dict(
            zip([*per_sequence, *counts], self.accelerator.reduce(sums, reduction="sum").tolist(), strict=True)
        )
        for name in per_sequence:
            self._metrics[mode][f"powerflow/{name}"].append(sums[name] / max(sums["valid"], 1.0))
        self._metrics[mode]["powerflow/non_finite_sequences"].append(sums["non_finite"])
        self._metrics[mode]["powerflow/alpha"].append(self.current_alpha())
        self._metrics[mode]["entropy"].append(sums["entropy"] / max(sums["tokens"], 1.0))
        return sums

    def _after_training_batch(self, sums):
        """Feeds the batch's entropy to an entropy-targeted α; stops after too many batches with nothing finite."""
        controller = self.alpha_controller
        if controller.adaptive:
            controller.observe(sums["entropy"], sums["tokens"])
            if controller.target() is not None:
                self._metrics["train"]["powerflow/target_entropy"].append(controller.target())
        # Non-finite rows are left out of the loss; a training batch with nothing else to learn from is a problem
        self._non_finite_batches = self._non_finite_batches + 1 if sums["valid"] == 0 and sums["non_finite"] else 0
        if self._non_finite_batches >= _MAX_NON_FINITE_BATCHES:
            raise RuntimeError(
                f"Every completion had a non-finite residual in {self._non_finite_batches} batches in a row (see "
                "`powerflow/non_finite_sequences`): the base model gives some sampled tokens zero probability, or "
                "the policy diverged. Check that the base model and the policy share the tokenizer, lower the "
                "learning rate, or resume from the last checkpoint."
            )

    # RunGuardMixin's hooks: the learned head and its optimizer, and α's controller, are part of a checkpoint
    def _run_state_files(self):
        return (LOG_Z_FILE,) if self.log_z is not None else ()

    def _save_run_state(self, output_dir):
        if self.args.should_save and self.log_z is not None:
            self.log_z_optimizer.save(output_dir)  # the head itself: `save_model`

    def _load_run_state(self, checkpoint):
        if self.log_z is not None:
            if not os.path.isfile(os.path.join(checkpoint, LOG_Z_FILE)):
                raise FileNotFoundError(
                    f"{checkpoint} has no {LOG_Z_FILE}: it was not written by PowerFlowTrainer, so log Z cannot be "
                    "restored. Resume from a PowerFlow checkpoint."
                )
            self.log_z.load(checkpoint)
            self.log_z_optimizer.load(checkpoint)
        alpha_state = self.state.stateful_callbacks.get(AlphaController.__name__)
        if alpha_state:  # Trainer restores callbacks only with `restore_callback_states_from_checkpoint`: α always is
            self.alpha_controller.restore(alpha_state)

    def save_model(self, output_dir=None, _internal_call=False):
        super().save_model(output_dir, _internal_call)
        output_dir = output_dir or self.args.output_dir
        # Here rather than in `_save`: checkpoints come through this method too, and DeepSpeed or sharded FSDP
        # save the model without `_save`
        if self.args.should_save and self.log_z is not None:
            os.makedirs(output_dir, exist_ok=True)
            self.log_z.save(output_dir)
        if not _internal_call and self.is_world_process_zero():
            # TRL writes the model card to `args.output_dir`: point it at the directory actually saved
            run_output_dir, self.args.output_dir = self.args.output_dir, output_dir
            try:
                self.create_model_card(model_name=os.path.basename(os.path.normpath(output_dir)))
            finally:
                self.args.output_dir = run_output_dir


@contextlib.contextmanager
def _no_features(prompt_ids):
    """A scalar log Z head (or none) reads nothing of the prompt: features of width 0."""
    yield lambda: prompt_ids.new_zeros(prompt_ids.size(0), 0, dtype=torch.float32)
