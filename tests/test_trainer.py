"""PowerFlowTrainer as a drop-in for GRPOTrainer: tiny models on a CPU, values asserted, not just "it ran"."""

import math
import os

import pytest
import torch
from conftest import make_config, make_model, make_tokenizer
from datasets import Dataset
from peft import LoraConfig
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, TrainerCallback
from trl import GRPOConfig

from trl_powerflow import PowerFlowTrainer


PROMPTS = ["p0 a", "p1 b"]
METRICS = ["log_z", "residual_abs", "residual_sq", "base_logp", "policy_logp", "completion_length", "clip_frac"]


def _dataset(n=8):
    return Dataset.from_dict({"prompt": [PROMPTS[i % 2] for i in range(n)]})


def _chat_dataset(n=8):
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": PROMPTS[i % 2]}] for i in range(n)]})


def _logs(trainer):
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def _snapshot(module):
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def _spy_generation(trainer):
    """Record every output of `_generate_and_score_completions` (the generation batch before shuffling)."""
    outputs, original = [], trainer._generate_and_score_completions

    def spy(inputs):
        output = original(inputs)
        outputs.append(output)
        return output

    trainer._generate_and_score_completions = spy
    return outputs


class _GradientRecorder(TrainerCallback):
    """Gradients of the policy and of the log Z head right before each optimizer step."""

    def __init__(self, trainer):
        self.trainer, self.steps = trainer, []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        def grads(module):
            params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
            return {n: None if p.grad is None else p.grad.clone() for n, p in params}

        log_z = self.trainer.log_z
        self.steps.append({"policy": grads(self.trainer.model), "log_z": {} if log_z is None else grads(log_z)})


def _trainer(tmp_path, tokenizer, model=None, dataset=None, **config):
    return PowerFlowTrainer(
        model=make_model(tokenizer) if model is None else model,
        args=make_config(tmp_path, **config),
        train_dataset=_dataset() if dataset is None else dataset,
        processing_class=tokenizer,
    )


# 1. Reward functions shape the target through ψ


def test_psi_is_the_weighted_sum_of_the_rewards(tmp_path, tokenizer):
    returned = {"length": [], "has_a": []}

    def length_reward(completions, **kwargs):
        values = [float(len(c.split())) for c in completions]
        returned["length"].extend(values)
        return values

    def has_a_reward(completions, **kwargs):
        values = [1.0 if "a" in c.split() else 0.0 for c in completions]
        returned["has_a"].extend(values)
        return values

    trainer = PowerFlowTrainer(
        model=make_model(tokenizer),
        reward_funcs=[length_reward, has_a_reward],
        args=make_config(tmp_path, reward_weights=[2.0, -0.5], max_steps=1),
        train_dataset=_dataset(),
        processing_class=tokenizer,
    )
    outputs = _spy_generation(trainer)
    trainer.train()

    assert len(outputs) == 1
    expected = 2.0 * torch.tensor(returned["length"]) - 0.5 * torch.tensor(returned["has_a"])
    assert expected.abs().sum() > 0  # the check below is not 0 == 0
    assert torch.equal(outputs[0]["psi"], expected)


@pytest.mark.parametrize("estimator", ["group", "learned"])
def test_constant_reward_shifts_log_z_by_alpha_times_c(tmp_path, tokenizer, estimator):
    # r = log Z + (1/|y|) log π − α[(1/|y|) log p_base + ψ]: a constant ψ = c is absorbed by log Z (+ α c) and
    # leaves the residuals, the loss and the policy's trajectory unchanged. SGD, not Adam: Adam turns the
    # rounding-level gradient of log Z at its first-batch start (mean residual ~ 1e-8) into a full step of either sign.
    alpha, c = 2.0, 0.75
    config = dict(alpha=alpha, log_z_estimator=estimator, log_z_conditioning="scalar", max_steps=2, optim="sgd")

    def constant_reward(completions, **kwargs):
        return [c] * len(completions)

    plain = _trainer(tmp_path / "plain", tokenizer, **config)
    plain.train()
    shaped = PowerFlowTrainer(
        model=make_model(tokenizer),
        reward_funcs=constant_reward,
        args=make_config(tmp_path / "shaped", **config),
        train_dataset=_dataset(),
        processing_class=tokenizer,
    )
    shaped.train()

    plain_logs, shaped_logs = _logs(plain), _logs(shaped)
    assert len(plain_logs) == len(shaped_logs) == 2
    for a, b in zip(plain_logs, shaped_logs, strict=True):
        assert b["powerflow/log_z"] - a["powerflow/log_z"] == pytest.approx(alpha * c, abs=1e-5)
        assert b["powerflow/residual_abs"] == pytest.approx(a["powerflow/residual_abs"], rel=1e-4, abs=1e-7)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-9)
        assert b["powerflow/policy_logp"] == pytest.approx(a["powerflow/policy_logp"], rel=1e-5)
    if estimator == "learned":
        assert shaped.log_z.bias.item() - plain.log_z.bias.item() == pytest.approx(alpha * c, abs=1e-5)


# 2. Fully unsupervised


def test_unsupervised_training_moves_the_policy_and_logs(tmp_path, tokenizer):
    trainer = _trainer(tmp_path, tokenizer, max_steps=3)
    before = _snapshot(trainer.model)
    trainer.train()

    assert trainer.reward_funcs == [] and trainer.reward_weights.numel() == 0
    logs = _logs(trainer)
    assert len(logs) == 3
    for entry in logs:
        assert math.isfinite(entry["loss"])
        for name in METRICS:
            assert math.isfinite(entry[f"powerflow/{name}"]), name
        assert entry["powerflow/residual_sq"] == pytest.approx(entry["loss"], rel=1e-5)  # on-policy: w = 1, GA = 1
        assert 1 <= entry["powerflow/completion_length"] <= 3
        assert entry["powerflow/clip_frac"] == 0.0  # one update per generation: on-policy
        assert not any(key.startswith("rewards/") for key in entry)  # the placeholder reward is gone
    # First step: the policy is the base, and log Z is the group mean of (α − 1)·base log-prob: on-policy the
    # residuals of every group sum to zero
    first = logs[0]
    assert first["powerflow/policy_logp"] == first["powerflow/base_logp"]
    assert first["powerflow/log_z"] == pytest.approx(-(1 - 4.0) * first["powerflow/base_logp"], rel=1e-4)
    assert all(abs(entry["powerflow/residual_mean"]) < 1e-6 for entry in logs)
    moved = [n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])]
    assert len(moved) == len(before)


# 3. Conversational prompts


def test_conversational_prompts_use_the_chat_template(tmp_path, tokenizer):
    trainer = _trainer(tmp_path, tokenizer, dataset=_chat_dataset(), max_steps=1)
    outputs = _spy_generation(trainer)
    trainer.train()

    ids, mask = outputs[0]["prompt_ids"], outputs[0]["prompt_mask"].bool()
    expected = {
        tuple(tokenizer.convert_tokens_to_ids(["user:", prompt.split()[0], prompt.split()[1], "assistant:"]))
        for prompt in PROMPTS
    }
    assert {tuple(row[m].tolist()) for row, m in zip(ids, mask, strict=True)} <= expected
    assert math.isfinite(_logs(trainer)[0]["loss"])


# 4. LoRA: the base is the adapter-disabled model


def test_lora_keeps_base_weights_and_needs_no_reference_copy(tmp_path, tokenizer):
    model = make_model(tokenizer)
    base_before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = PowerFlowTrainer(
        model=model,
        args=make_config(tmp_path, max_steps=2),
        train_dataset=_dataset(),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    assert trainer.ref_model is None
    lora_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    assert lora_before and all(p.requires_grad == ("lora_" in n) for n, p in trainer.model.named_parameters())
    trainer.train()

    assert trainer.ref_model is None
    params = dict(trainer.model.named_parameters())
    lora_moved = [n for n in lora_before if "lora_B" in n and not torch.equal(params[n], lora_before[n])]
    assert len(lora_moved) == 2
    base_after = {
        n.replace("base_model.model.", "", 1).replace(".base_layer", ""): p
        for n, p in trainer.model.named_parameters()
        if "lora_" not in n
    }
    assert base_after.keys() == base_before.keys()
    assert all(torch.equal(base_after[n], base_before[n]) for n in base_before)
    # At step 1, LoRA B = 0: the policy is the adapter-disabled base, exactly
    first = _logs(trainer)[0]
    assert first["powerflow/policy_logp"] == first["powerflow/base_logp"]


# 5. Model as a path or as an object, full fine-tuning


def _save_tiny(tokenizer, path, seed=0):
    model = make_model(tokenizer, seed=seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


def _assert_reference_is(trainer, expected):
    ref = trainer.accelerator.unwrap_model(trainer.ref_model)
    ref_params = dict(ref.named_parameters())
    assert ref_params.keys() == expected.keys()
    assert all(torch.equal(ref_params[n], expected[n]) for n in expected)
    return ref


def test_model_as_path_trains_against_the_saved_weights(tmp_path, tokenizer):
    path = str(tmp_path / "tiny")
    saved = _snapshot(_save_tiny(tokenizer, path))
    trainer = _trainer(tmp_path / "out", tokenizer, model=path)
    trainer.train()

    assert trainer.ref_model is not None
    _assert_reference_is(trainer, saved)
    policy = dict(trainer.model.named_parameters())
    assert all(not torch.equal(policy[n], saved[n]) for n in saved)
    assert all(math.isfinite(entry["loss"]) for entry in _logs(trainer))


@pytest.mark.parametrize("origin", ["code", "path_then_edited"])
def test_model_as_object_keeps_a_frozen_copy_as_reference(tmp_path, tokenizer, origin):
    if origin == "code":
        model = make_model(tokenizer)  # no `_name_or_path`: GRPO alone could not rebuild a reference
    else:
        # `_name_or_path` points to weights that are no longer the object's: the reference must be the object
        path = str(tmp_path / "tiny")
        _save_tiny(tokenizer, path)
        model = AutoModelForCausalLM.from_pretrained(path)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)
    initial = _snapshot(model)
    trainer = _trainer(tmp_path / "out", tokenizer, model=model)
    trainer.train()

    assert trainer.ref_model is not None
    ref = _assert_reference_is(trainer, initial)
    assert not any(p.requires_grad for p in ref.parameters())
    assert not any(p is q for p in ref.parameters() for q in trainer.model.parameters())
    assert all(not torch.equal(p, initial[n]) for n, p in trainer.model.named_parameters())
    first = _logs(trainer)[0]
    assert first["powerflow/policy_logp"] == first["powerflow/base_logp"]  # the base is the object at step 0


# 6. beta does not leak; alpha = 1 is a fixed point at init


@pytest.mark.filterwarnings("ignore:`beta=:UserWarning")
def test_beta_does_not_enter_the_loss(tmp_path, tokenizer):
    runs = {}
    for beta in (0.0, 0.5):
        trainer = _trainer(tmp_path / str(beta), tokenizer, beta=beta, max_steps=2)
        trainer.train()
        assert trainer.args.beta == beta  # the user's value is restored after __init__
        runs[beta] = (trainer, [entry["loss"] for entry in _logs(trainer)])
    (plain, plain_losses), (with_beta, beta_losses) = runs[0.0], runs[0.5]
    assert plain_losses == beta_losses and plain_losses[0] > 0
    assert not any(key.startswith("kl") for entry in _logs(with_beta) for key in entry)
    policy = dict(with_beta.model.named_parameters())
    assert all(torch.equal(policy[n], p) for n, p in plain.model.named_parameters())


@pytest.mark.parametrize(
    "estimator,log_z_init", [("group", "first_batch"), ("learned", "first_batch"), ("learned", "zero")]
)
def test_alpha_one_is_a_fixed_point_at_init(tmp_path, tokenizer, estimator, log_z_init):
    # π_θ = p_base at step 0 and α = 1: the residual is log Z' alone, and log Z' starts at exactly 0 either way
    # (first_batch fits it to targets that are all 0; the group mean of zeros is 0).
    trainer = _trainer(tmp_path, tokenizer, alpha=1.0, max_steps=1, log_z_estimator=estimator, log_z_init=log_z_init)
    recorder = _GradientRecorder(trainer)
    trainer.add_callback(recorder)
    before = _snapshot(trainer.model)
    trainer.train()

    first = _logs(trainer)[0]
    assert first["loss"] == 0.0
    assert first["powerflow/residual_abs"] == 0.0 and first["powerflow/log_z"] == 0.0
    assert first["powerflow/policy_logp"] == first["powerflow/base_logp"] < 0
    grads = recorder.steps[0]
    for group in ("policy", "log_z") if estimator == "learned" else ("policy",):
        assert grads[group] and all(g is not None and not g.any() for g in grads[group].values()), group
    assert all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())


# 7. Gradient accumulation


@pytest.mark.parametrize("with_invalid_row", [False, True])
@pytest.mark.parametrize("estimator", ["group", "learned"])
def test_gradient_accumulation_matches_one_big_batch(tmp_path, tokenizer, estimator, with_invalid_row):
    # Same 8 completions (generation batch 8 either way), split into 2 micro-batches of 4 or kept as one batch of 8:
    # the accumulated gradients and the logged loss must agree (TRL expects the loss already divided by GA). With the
    # group estimate, 2 prompts x 4 samples: each micro-batch must hold one whole group (TRL's sample-wise shuffle
    # would split them). A sequence left out of the loss (a -inf base log-prob) must not make the other sequences of
    # its micro-batch weigh more than those of the other one.
    runs = {}
    for ga, batch in ((1, 8), (2, 4)):
        trainer = _trainer(
            tmp_path / f"ga{ga}",
            tokenizer,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=ga,
            max_steps=1,
            dataset=_dataset(2),  # two distinct prompts in every generation batch
            log_z_estimator=estimator,
            num_generations=4 if estimator == "group" else 8,
            log_z_init="zero",  # first_batch would fit log Z on the first micro-batch only
            log_z_conditioning="scalar",
            max_grad_norm=0.0,
        )
        recorder = _GradientRecorder(trainer)
        trainer.add_callback(recorder)
        outputs = _spy_generation(trainer)
        if with_invalid_row:
            generate = trainer._generate_and_score_completions

            def corrupted(inputs, generate=generate):
                output = generate(inputs)
                output["ref_per_token_logps"][0, 0] = float("-inf")
                return output

            trainer._generate_and_score_completions = corrupted
        trainer.train()
        runs[ga] = (_logs(trainer)[0], recorder.steps[0], outputs[0]["completion_ids"])
        assert (_logs(trainer)[0]["powerflow/non_finite_sequences"] > 0) == with_invalid_row

    (log1, grads1, completions1), (log2, grads2, completions2) = runs[1], runs[2]
    assert torch.equal(completions1, completions2)  # the comparison is on the same samples
    if estimator == "learned":
        bias1, bias2 = grads1["log_z"]["bias"], grads2["log_z"]["bias"]
        assert bias1.abs() > 1e-3
        torch.testing.assert_close(bias2, bias1, rtol=1e-5, atol=0)
    assert log2["loss"] == pytest.approx(log1["loss"], rel=1e-5) and log1["loss"] > 1e-4
    for name, g1 in grads1["policy"].items():
        torch.testing.assert_close(grads2["policy"][name], g1, rtol=1e-4, atol=1e-7)


# 8. Checkpoints, resume and the model card


class _LogZAtTrainBegin(TrainerCallback):
    def __init__(self, trainer):
        self.trainer, self.state = trainer, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.state = {k: v.detach().clone() for k, v in self.trainer.log_z.state_dict().items()}


def test_checkpoint_saves_and_resume_restores_log_z(tmp_path, tokenizer):
    out = tmp_path / "out"
    config = dict(max_steps=2, save_strategy="steps", save_steps=1, log_z_estimator="learned")
    first = _trainer(out, tokenizer, **config)
    first.train()
    for step in (1, 2):
        assert os.path.isfile(out / f"checkpoint-{step}" / "log_z.safetensors")
    saved = load_file(out / "checkpoint-1" / "log_z.safetensors")
    assert bool(saved["initialized"])
    final = load_file(out / "checkpoint-2" / "log_z.safetensors")
    assert not torch.equal(saved["bias"], final["bias"])  # each checkpoint holds its own step's head

    resumed = _trainer(out, tokenizer, **config)
    assert not bool(resumed.log_z.initialized)
    probe = _LogZAtTrainBegin(resumed)
    resumed.add_callback(probe)
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-1"))

    assert probe.state.keys() == saved.keys()
    assert all(torch.equal(probe.state[k], saved[k]) for k in saved)
    assert resumed.state.global_step == 2 and [entry["step"] for entry in _logs(resumed)] == [1, 2]
    # Not started again from the first batch: the logged log Z at step 2 comes from the restored head
    restored_log_z = _logs(resumed)[1]["powerflow/log_z"]
    assert restored_log_z == pytest.approx(_logs(first)[1]["powerflow/log_z"], rel=1e-5)

    resumed.save_model()
    written = load_file(out / "log_z.safetensors")
    assert all(torch.equal(written[k], v.cpu()) for k, v in resumed.log_z.state_dict().items())
    card = (out / "README.md").read_text()
    assert "PowerFlow" in card and "2603.18363" in card


def test_resume_from_a_checkpoint_without_log_z_fails_loudly(tmp_path, tokenizer):
    out = tmp_path / "out"
    config = dict(save_strategy="steps", save_steps=1, log_z_estimator="learned")
    first = _trainer(out, tokenizer, max_steps=1, **config)
    first.train()
    os.remove(out / "checkpoint-1" / "log_z.safetensors")
    resumed = _trainer(out, tokenizer, max_steps=2, **config)
    with pytest.raises(FileNotFoundError, match="log_z.safetensors"):
        resumed.train(resume_from_checkpoint=str(out / "checkpoint-1"))


@pytest.mark.parametrize("estimator", ["group", "learned"])
def test_save_model_elsewhere_writes_the_model_card_there(tmp_path, tokenizer, estimator):
    trainer = _trainer(tmp_path / "out", tokenizer, max_steps=1, log_z_estimator=estimator)
    trainer.train()
    other = tmp_path / "other"
    trainer.save_model(str(other))
    assert (other / "log_z.safetensors").is_file() == (estimator == "learned")  # the group estimate has no state
    assert not (tmp_path / "out" / "README.md").exists()
    assert "2603.18363" in (other / "README.md").read_text()


# 9. 4-bit base with LoRA on the CPU


def test_4bit_lora_on_cpu(tmp_path, tokenizer):
    path = str(tmp_path / "tiny")
    make_model(tokenizer, hidden_size=64).save_pretrained(path)
    tokenizer.save_pretrained(path)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    try:  # skip only when bitsandbytes itself cannot run 4-bit on this machine
        probe = AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization, device_map="cpu")
        probe(torch.tensor([[2, 3]]))
    except Exception as error:  # noqa: BLE001
        pytest.skip(f"bitsandbytes cannot run 4-bit on this CPU: {error}")
    del probe

    trainer = PowerFlowTrainer(
        model=path,
        args=make_config(
            tmp_path / "out", model_init_kwargs={"quantization_config": quantization, "device_map": "cpu"}
        ),
        train_dataset=_dataset(),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    assert trainer.ref_model is None
    assert "Linear4bit" in {type(m).__name__ for m in trainer.model.modules()}
    lora_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    frozen_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" not in n}
    trainer.train()

    params = dict(trainer.model.named_parameters())
    assert len(lora_before) == 2 and all(not torch.equal(params[n], p) for n, p in lora_before.items())
    assert all(torch.equal(params[n], p) for n, p in frozen_before.items())
    assert all(math.isfinite(entry["loss"]) for entry in _logs(trainer))


# 10. Errors


def test_plain_grpo_config_is_refused(tmp_path, tokenizer):
    args = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none")
    with pytest.raises(TypeError, match="PowerFlowConfig"):
        PowerFlowTrainer(model=make_model(tokenizer), args=args, train_dataset=_dataset(), processing_class=tokenizer)


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan"), float("inf")])
def test_invalid_alpha(tmp_path, alpha):
    with pytest.raises(ValueError, match="`alpha`"):
        make_config(tmp_path, alpha=alpha)


def test_temperature_must_be_one(tmp_path):
    with pytest.raises(ValueError, match="`temperature=0.7` is not supported"):
        make_config(tmp_path, temperature=0.7)


@pytest.mark.parametrize(
    "dataset, tokenizer_kwargs, match",
    [
        (Dataset.from_dict({"question": ["p0 a"] * 8}), {}, "no 'prompt' column"),
        (Dataset.from_dict({"prompt": []}), {}, "empty"),
        (_chat_dataset(), {"chat_template": None}, "chat template"),
    ],
    ids=["no_prompt_column", "empty", "chat_without_template"],
)
def test_dataset_errors(tmp_path, dataset, tokenizer_kwargs, match):
    tokenizer = make_tokenizer(**tokenizer_kwargs)
    with pytest.raises(ValueError, match=match):
        PowerFlowTrainer(
            model=make_model(tokenizer), args=make_config(tmp_path), train_dataset=dataset, processing_class=tokenizer
        )


# 10. log Z tracks its target


def test_residual_metrics_have_exact_values(tmp_path, tokenizer):
    from trl_powerflow import powerflow_loss

    trainer = _trainer(tmp_path, tokenizer, log_z_estimator="learned")
    policy = torch.tensor([[-1.0, -1.0], [-2.0, 0.0], [-1.0, -1.0]])
    base = torch.tensor([[-1.0, -1.0], [-0.5, 0.0], [-1.0, -1.0]])
    mask = torch.tensor([[1, 1], [1, 0], [0, 0]])  # the last row has no token: left out
    out = powerflow_loss(policy, base, mask, torch.tensor([1.0, -2.0, 5.0]), alpha=2.0)
    trainer._log_metrics(out, torch.zeros(3, 2), mask, torch.tensor([0, 0, 1]), "train")

    # t = 2·(1/|y|) log p − (1/|y|) log π: −1 and 1; r = log Z' − t: 2 and −3
    metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}
    assert metrics["powerflow/residual_mean"] == pytest.approx(-0.5)
    assert metrics["powerflow/residual_abs"] == pytest.approx(2.5)
    assert metrics["powerflow/residual_sq"] == pytest.approx(6.5)
    assert metrics["powerflow/log_z"] == pytest.approx(-0.5)
    assert metrics["powerflow/policy_logp"] == pytest.approx(-1.5)  # per token: (−1 − 2) / 2
    assert metrics["powerflow/base_logp"] == pytest.approx(-0.75)
    assert metrics["powerflow/non_finite_sequences"] == 0.0
    assert metrics["powerflow/log_z_gap"] == pytest.approx(0.5)  # rows 0 and 1 share a prompt: |(2 − 3) / 2|

    # A row whose base log-prob is -inf (a token the base model cannot produce) is left out of every mean
    base_with_inf = torch.cat([base, torch.tensor([[float("-inf"), -1.0]])])
    policy, mask = torch.cat([policy, policy[:1]]), torch.cat([mask, mask[:1]])
    out = powerflow_loss(policy, base_with_inf, mask, torch.tensor([1.0, -2.0, 5.0, 0.0]), alpha=2.0)
    trainer._log_metrics(out, torch.zeros(4, 2), mask, torch.tensor([0, 0, 1, 2]), "train")
    after = {name: values[-1] for name, values in trainer._metrics["train"].items()}
    for name in ["log_z", "residual_mean", "base_logp", "policy_logp", "completion_length", "log_z_gap"]:
        assert after[f"powerflow/{name}"] == pytest.approx(metrics[f"powerflow/{name}"]), name
    assert after["powerflow/non_finite_sequences"] == 1.0


@pytest.mark.parametrize("estimator", ["group", "learned"])
def test_a_head_started_far_from_its_target_lags_where_the_group_estimate_does_not(tmp_path, tokenizer, estimator):
    # α = 4 and log Z' started at 0 where its target, (α − 1)·base log-prob per token, is several nats below: a
    # learned head moves about its learning rate per step (Adam) and keeps the residual one-signed
    from trl_powerflow import CollapseGuardCallback

    guard = CollapseGuardCallback(max_abs_residual_mean=1.0, patience=2, stop=True)
    trainer = _trainer(
        tmp_path, tokenizer, alpha=4.0, max_steps=6, log_z_estimator=estimator, log_z_init="zero", learning_rate=1e-3
    )
    trainer.add_callback(guard)
    trainer.train()
    residual_means = [entry["powerflow/residual_mean"] for entry in _logs(trainer)]
    if estimator == "group":
        assert all(abs(r) < 1e-5 for r in residual_means)
        assert guard.stopped_because is None and trainer.state.global_step == 6
    else:
        assert residual_means[0] > 3.0
        assert guard.stopped_because.startswith("log Z lags its target") and trainer.state.global_step < 6


def test_log_z_head_keeps_a_constant_learning_rate_outside_gradient_clipping(tmp_path, tokenizer):
    class Recorder(TrainerCallback):
        def __init__(self):
            self.steps = []

        def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            bias = trainer.log_z.bias
            self.steps.append(
                {
                    "bias": bias.item(),
                    "grad": bias.grad.item(),
                    "policy_lr": optimizer.param_groups[0]["lr"],
                    "head_lr": trainer.log_z_optimizer.optimizer.param_groups[0]["lr"],
                }
            )

        def on_optimizer_step(self, args, state, control, **kwargs):
            self.steps[-1]["bias_after"] = trainer.log_z.bias.item()

    trainer = _trainer(
        tmp_path,
        tokenizer,
        log_z_estimator="learned",
        log_z_learning_rate=0.05,
        log_z_init="zero",  # far from its target: a large gradient
        learning_rate=1e-2,
        lr_scheduler_type="linear",
        warmup_steps=1,
        max_steps=4,
        optim="sgd",
        max_grad_norm=1e-6,  # clips the policy's gradient to nothing; the head's must stay whole
    )
    recorder = Recorder()
    trainer.add_callback(recorder)
    trainer.train()
    policy_lrs = [step["policy_lr"] for step in recorder.steps]
    assert policy_lrs[0] == 0.0 and len(set(policy_lrs)) > 2  # the policy warms up and decays...
    assert all(step["head_lr"] == 0.05 for step in recorder.steps)  # ...the head does not
    for step in recorder.steps:
        assert abs(step["grad"]) > 1e-3
        assert step["bias_after"] == pytest.approx(step["bias"] - 0.05 * step["grad"], rel=1e-6)


# 11. num_iterations > 1 without the old policy's extra forward


def test_later_passes_reuse_the_first_passs_log_probs(tmp_path, tokenizer):
    # The first pass over a generation batch runs before any optimizer step, so its policy log-probs are the sampling
    # policy's: TRL's extra no-grad forward gives the same numbers, and the run must not change
    runs = {}
    for reuse in (True, False):
        trainer = _trainer(tmp_path / str(reuse), tokenizer, num_iterations=2, max_steps=4, learning_rate=1e-2)
        if not reuse:
            trainer._reuses_first_pass = lambda: False
        forwards, original = [], trainer._get_per_token_logps_and_entropies

        def counted(model, *args, original=original, forwards=forwards, **kwargs):
            forwards.append(torch.is_grad_enabled())
            return original(model, *args, **kwargs)

        trainer._get_per_token_logps_and_entropies = counted
        trainer.train()
        runs[reuse] = (trainer, forwards)

    (reused, reused_forwards), (plain, plain_forwards) = runs[True], runs[False]
    # 2 generations x (1 base pass + [1 old-policy pass]) without gradients, 4 passes with them
    assert plain_forwards.count(False) == 4 and reused_forwards.count(False) == 2
    assert plain_forwards.count(True) == reused_forwards.count(True) == 4
    for a, b in zip(_logs(plain), _logs(reused), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["powerflow/clip_frac"] == a["powerflow/clip_frac"]
    assert any(log["loss"] > 0 for log in _logs(plain))
    for (name, p), q in zip(plain.model.named_parameters(), reused.model.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)


# 12. vLLM's sampler never enters the objective


def test_vllm_importance_ratio_and_sampler_log_probs_do_not_enter_the_loss(tmp_path, tokenizer):
    # With vLLM, TRL adds the sampler's log-probs and a sampler/trainer importance ratio to the batch, and GRPO
    # multiplies its loss by that ratio. Trajectory balance's fixed point does not depend on the sampling
    # distribution (as long as it covers the support): the residual takes the trained model's and the base model's
    # log-probs only, and w compares the trained model with itself at sampling time.
    trainer = _trainer(tmp_path, tokenizer, max_steps=1)
    seen, compute_loss = [], trainer._compute_loss

    def spy(model, inputs):
        seen.append(dict(inputs))
        return compute_loss(model, inputs)

    trainer._compute_loss = spy
    trainer.train()
    inputs = seen[0]
    plain = compute_loss(trainer.model, dict(inputs)).item()
    vllm = dict(inputs)
    vllm["importance_sampling_ratio"] = torch.rand(inputs["completion_ids"].shape) * 3
    vllm["sampling_per_token_logps"] = torch.full(inputs["completion_ids"].shape, -20.0)
    assert compute_loss(trainer.model, vllm).item() == plain and plain > 0


# 13. α warmup


def test_alpha_warmup_is_linear_from_one_to_alpha(tmp_path, tokenizer):
    trainer = _trainer(tmp_path, tokenizer, alpha=3.0, alpha_warmup_steps=4, max_steps=6)
    trainer.train()
    logs = _logs(trainer)
    # logged at steps 1..6, each computed at global step 0..5: 1 + (3 − 1)·min(1, step / 4)
    assert [log["powerflow/alpha"] for log in logs] == [1.0, 1.5, 2.0, 2.5, 3.0, 3.0]
    assert logs[0]["loss"] == 0.0 and logs[1]["loss"] > 0  # α = 1 at the base model: nothing to learn yet
    with pytest.raises(ValueError, match="alpha_warmup_steps"):
        make_config(tmp_path, alpha_warmup_steps=-1)


def test_a_log_z_head_on_another_prompt_feature_is_refused_and_a_legacy_one_loads(tmp_path):
    from safetensors.torch import save_file

    from trl_powerflow.log_z import LogZ

    LogZ("hidden", 8).save(str(tmp_path))
    with pytest.raises(ValueError, match="`log_z_conditioning='hidden'` to resume"):
        LogZ("embedding", 8).load(str(tmp_path))
    LogZ("hidden", 8).load(str(tmp_path))
    # Before the choice of features, a prompt-conditioned head read the mean input embedding
    legacy = LogZ("embedding", 8)
    legacy.start_at(-3.0)
    tensors = {name: tensor.contiguous() for name, tensor in legacy.state_dict().items()}
    save_file(tensors, str(tmp_path / "log_z.safetensors"), metadata={"embedding_dim": "8", "hidden_size": "256"})
    restored = LogZ("embedding", 8)
    restored.load(str(tmp_path))
    assert restored.bias.item() == -3.0 and bool(restored.initialized)
    with pytest.raises(ValueError, match="'embedding'"):
        LogZ().load(str(tmp_path))
