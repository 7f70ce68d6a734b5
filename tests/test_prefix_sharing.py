"""
Prefix sharing computes each prompt once per group and must change nothing: per-token log-probs, entropies and every
parameter gradient agree with the unshared pass (TRL's), on left-padded prompts of different lengths, across
architectures, with LoRA or full fine-tuning, with gradient checkpointing on or off; for PowerFlowTrainer and for
TRL's GRPOTrainer with `PrefixSharingMixin` (GRPO's loss, its reference pass and every gradient).
"""

import pytest
import torch
import transformers
from conftest import make_config, make_model, make_tokenizer
from datasets import Dataset
from peft import LoraConfig
from trl import GRPOConfig, GRPOTrainer

import trl_powerflow.prefix_sharing
from trl_powerflow import PowerFlowTrainer, SharedPrefixGRPOTrainer
from trl_powerflow.log_z import _decoder, captured_prompt_features
from trl_powerflow.prefix_sharing import generate_from_shared_prefill, shared_prefix_logps


def _config(name, vocab_size):
    common = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    if name == "gemma3":  # one sliding-window layer, narrower than the sequences, and one global layer
        return transformers.Gemma3TextConfig(
            **common, head_dim=8, sliding_window=4, layer_types=["sliding_attention", "full_attention"]
        )
    if name == "gpt_neox":
        common = {k: v for k, v in common.items() if k not in ("num_key_value_heads",)}
        return transformers.GPTNeoXConfig(**common)
    classes = {
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
        "mistral": transformers.MistralConfig,
        "phi3": transformers.Phi3Config,
    }
    return classes[name](**common)


ARCHITECTURES = ["llama", "qwen2", "qwen3", "gemma3", "mistral", "phi3", "gpt_neox"]


def _batch(vocab_size, seed=0):
    """Three prompts of lengths 2, 4 and 6 (left-padded), 3 + 2 + 3 samples with completions of different lengths."""
    generator = torch.Generator().manual_seed(seed)
    prompts = torch.zeros(3, 6, dtype=torch.long)
    for row, length in enumerate((2, 4, 6)):
        prompts[row, 6 - length :] = torch.randint(2, vocab_size, (length,), generator=generator)
    rows = torch.tensor([0, 1, 2, 0, 2, 1, 0, 2])
    completions = torch.randint(2, vocab_size, (8, 5), generator=generator)
    completion_mask = torch.ones(8, 5, dtype=torch.long)
    completion_mask[0, 3:] = 0
    completion_mask[4, 1:] = 0
    completions[completion_mask == 0] = 0
    input_ids = torch.cat([prompts[rows], completions], dim=1)
    attention_mask = torch.cat([(prompts[rows] != 0).long(), completion_mask], dim=1)
    return input_ids, attention_mask, completion_mask


def _trainer(tmp_path, name, lora, gradient_checkpointing):
    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config(name, len(tokenizer)))
    args = make_config(
        tmp_path,
        gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM") if lora else None
    dataset = Dataset.from_dict({"prompt": ["p0", "p1"] * 4})
    return PowerFlowTrainer(
        model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config
    )


def _logps_and_grads(trainer, compute, input_ids, attention_mask, completion_mask):
    model = trainer.model
    model.zero_grad(set_to_none=True)
    logps, entropies = compute(model, input_ids, attention_mask)
    # A loss that weighs each position differently, so that a gradient summed in the wrong place shows
    weights = torch.linspace(0.5, 1.5, logps.numel()).view_as(logps)
    ((logps * weights + entropies) * completion_mask).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return logps.detach(), entropies.detach(), grads


@pytest.mark.parametrize("name", ARCHITECTURES)
@pytest.mark.parametrize("lora,gradient_checkpointing", [(False, False), (True, True)])
def test_shared_prefix_matches_the_unshared_pass(tmp_path, name, lora, gradient_checkpointing):
    trainer = _trainer(tmp_path, name, lora, gradient_checkpointing)
    trainer.model.train()
    if gradient_checkpointing:  # the Trainer turns it on when training starts
        trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    modules = [m for m in trainer.model.modules() if hasattr(m, "gradient_checkpointing")]
    assert any(m.gradient_checkpointing for m in modules) == gradient_checkpointing
    input_ids, attention_mask, completion_mask = _batch(trainer.model.config.vocab_size)
    length = completion_mask.size(1)

    def unshared(model, ids, mask):
        logps, entropies, _ = GRPOTrainer._get_per_token_logps_and_entropies(
            trainer, model, ids, mask, length, compute_entropy=True
        )
        return logps, entropies

    def shared(model, ids, mask):
        return shared_prefix_logps(model, model, ids, mask, length, compute_entropy=True)

    expected = _logps_and_grads(trainer, unshared, input_ids, attention_mask, completion_mask)
    actual = _logps_and_grads(trainer, shared, input_ids, attention_mask, completion_mask)
    torch.testing.assert_close(actual[0], expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(actual[1], expected[1], rtol=1e-5, atol=1e-5)
    assert expected[2] and actual[2].keys() == expected[2].keys()
    assert sum(g.abs().sum() for g in expected[2].values()) > 0
    for n, g in expected[2].items():  # 1e-5 relative to the largest entry: summation order differs
        assert (actual[2][n] - g).abs().max() <= 1e-5 * g.abs().max(), n


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_generation_from_a_shared_prefill_samples_the_same_tokens(name):
    # Same logits at every step and the same random draws: with the same seed, the very same samples
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config(name, 9)).eval()
    input_ids, attention_mask, _ = _batch(9)
    prompts, prompt_mask = input_ids[:, :6], attention_mask[:, :6]
    config = transformers.GenerationConfig(
        do_sample=True, max_new_tokens=5, pad_token_id=0, eos_token_id=1, top_k=0, top_p=1.0
    )
    torch.manual_seed(1)
    expected = model.generate(input_ids=prompts, attention_mask=prompt_mask, generation_config=config)
    torch.manual_seed(1)
    shared = generate_from_shared_prefill(
        model, model.generate, input_ids=prompts, attention_mask=prompt_mask, generation_config=config
    )
    assert torch.equal(shared, expected)
    assert (expected[:, 6:] != 0).sum() > 8  # the samples are not all padding


def test_nothing_to_share_when_every_prompt_is_distinct_or_short(tmp_path):
    trainer = _trainer(tmp_path, "llama", lora=False, gradient_checkpointing=False)
    input_ids, attention_mask, completion_mask = _batch(trainer.model.config.vocab_size)
    distinct = torch.tensor([0, 1, 2])
    assert shared_prefix_logps(trainer.model, trainer.model, input_ids[distinct], attention_mask[distinct], 5) is None
    # A repeated prompt of 2 tokens before 30 completion tokens: the second model call would cost more than it saves
    short = torch.randint(2, 9, (8, 32))
    assert (
        shared_prefix_logps(
            trainer.model,
            trainer.model,
            short.clone().index_fill_(1, torch.tensor([0, 1]), 3),
            torch.ones_like(short),
            30,
        )
        is None
    )


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_training_with_and_without_sharing_is_the_same_run(tmp_path, monkeypatch, gradient_checkpointing):
    # LoRA, 2 prompts of different lengths x 4 samples, gradient accumulation over 2 micro-batches, 2 steps
    import trl_powerflow.prefix_sharing

    shared_passes = []

    def counted(*args, **kwargs):
        out = shared_prefix_logps(*args, **kwargs)
        shared_passes.append(out is not None)
        return out

    monkeypatch.setattr(trl_powerflow.prefix_sharing, "shared_prefix_logps", counted)
    prefills = []

    def counted_generate(model, generate, **kwargs):
        prefills.append(kwargs["input_ids"].size(0))
        return generate_from_shared_prefill(model, generate, **kwargs)

    monkeypatch.setattr(trl_powerflow.prefix_sharing, "generate_from_shared_prefill", counted_generate)
    tokenizer = make_tokenizer()
    runs = {}
    for sharing in (True, False):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(_config("qwen2", len(tokenizer)))
        args = make_config(
            tmp_path / str(sharing),
            prefix_sharing=sharing,
            per_device_train_batch_size=4,
            num_generations=4,
            gradient_accumulation_steps=2,
            gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
            max_completion_length=4,
            max_steps=2,
            optim="sgd",  # Adam would turn rounding-level gradients (LoRA A, while B = 0) into full steps
        )
        trainer = PowerFlowTrainer(
            model,
            args=args,
            train_dataset=Dataset.from_dict({"prompt": ["p0 a b c", "p1"]}),
            processing_class=tokenizer,
            peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"),
        )
        trainer.train()
        runs[sharing] = trainer
    shared, unshared = runs[True], runs[False]
    # per step: the base pass over 2 chunks of one group each, then 2 policy micro-batches of one group each
    assert shared_passes == [True] * 8
    assert prefills == [8, 8]  # one generation batch (2 prompts x 4 samples) per step
    losses = [[log["loss"] for log in run.state.log_history if "loss" in log] for run in (shared, unshared)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5) and max(losses[1]) > 0
    for (name, p), q in zip(unshared.model.named_parameters(), shared.model.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("name", ["llama", "gemma3", "gpt_neox"])
@pytest.mark.parametrize("lora,gradient_checkpointing", [(False, False), (True, True)])
@pytest.mark.parametrize("sharing", [True, False])
def test_log_z_prompt_features_are_read_off_the_pass_shared_or_not(
    tmp_path, name, lora, gradient_checkpointing, sharing
):
    """The learned head's features, captured from the policy's pass (one or two calls per chunk of rows), equal the
    mean input embedding of each prompt and the decoder's last-layer state at its last token."""
    trainer = _trainer(tmp_path, name, lora, gradient_checkpointing)
    trainer.args.prefix_sharing = sharing
    trainer.model.train()
    if gradient_checkpointing:
        trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    input_ids, attention_mask, completion_mask = _batch(trainer.model.config.vocab_size)
    length = completion_mask.size(1)
    prompt_ids, prompt_mask = input_ids[:, :-length], attention_mask[:, :-length]
    model = trainer.model
    with torch.no_grad():
        embeds = model.get_input_embeddings()(prompt_ids) * prompt_mask.unsqueeze(-1)
        expected = {
            "embedding": embeds.sum(1) / prompt_mask.sum(1, keepdim=True),
            "hidden": _decoder(model)(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 5],
        }
    for feature, value in expected.items():
        with captured_prompt_features(model, feature, prompt_ids, prompt_mask) as features:
            trainer._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, length, batch_size=4, compute_entropy=True
            )
        torch.testing.assert_close(features(), value, rtol=1e-5, atol=1e-5, msg=feature)
    # Rows of the same prompt share its features; different prompts do not
    assert torch.equal(expected["hidden"][0], expected["hidden"][3])
    assert not torch.allclose(expected["hidden"][0], expected["hidden"][1])


def _count_shared_passes(monkeypatch):
    """Every shared scoring pass and shared prefill, recorded as it happens: `True` when it shared."""
    calls = {"scoring": [], "generation": []}

    def scoring(*args, **kwargs):
        out = shared_prefix_logps(*args, **kwargs)
        calls["scoring"].append(out is not None)
        return out

    def generation(model, generate, **kwargs):
        agree = kwargs.pop("agree")
        return generate_from_shared_prefill(
            model, generate, agree=lambda worth: calls["generation"].append(agree(worth)) or calls["generation"][-1],
            **kwargs,
        )  # fmt: skip

    monkeypatch.setattr(trl_powerflow.prefix_sharing, "shared_prefix_logps", scoring)
    monkeypatch.setattr(trl_powerflow.prefix_sharing, "generate_from_shared_prefill", generation)
    return calls


def completion_length_reward(completions, **kwargs):
    return [float(len(completion)) for completion in completions]


def grpo_config(output_dir, **overrides):
    """`make_config`'s settings in a plain GRPOConfig (no `prefix_sharing` field): GRPO's default loss, beta > 0."""
    settings = make_config(output_dir).to_dict()
    kept = {name: settings[name] for name in ["use_cpu", "bf16", "report_to", "max_steps", "logging_steps", "seed"]}
    kwargs = dict(kept, output_dir=str(output_dir), save_strategy="no", disable_tqdm=True, beta=0.1)
    kwargs.update(per_device_train_batch_size=8, num_generations=4, max_completion_length=4, learning_rate=1e-2)
    return GRPOConfig(**{**kwargs, **overrides})


@pytest.mark.parametrize("name", ARCHITECTURES)
@pytest.mark.parametrize("lora,gradient_checkpointing", [(False, False), (True, True)])
def test_grpo_loss_and_gradients_are_the_same_with_the_mixin(
    tmp_path, monkeypatch, name, lora, gradient_checkpointing
):
    # One generation batch (shared prefill), its reference pass (beta > 0) and GRPO's loss with its policy pass,
    # under the same seed with sharing on and off
    calls = _count_shared_passes(monkeypatch)
    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    # A path, not an object: GRPO loads its frozen reference (beta > 0, full fine-tuning) from it
    transformers.AutoModelForCausalLM.from_config(_config(name, len(tokenizer))).save_pretrained(tmp_path / "model")
    args = grpo_config(tmp_path, gradient_checkpointing=gradient_checkpointing)
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM") if lora else None
    trainer = SharedPrefixGRPOTrainer(
        str(tmp_path / "model"), completion_length_reward, args=args, processing_class=tokenizer,
        train_dataset=Dataset.from_dict({"prompt": ["p0 a b c", "p1"]}), peft_config=peft_config,
    )  # fmt: skip
    assert (trainer.ref_model is None) == lora  # under LoRA, the adapter-disabled model is the reference
    trainer.model.train()
    if gradient_checkpointing:
        trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    prompts = [{"prompt": "p0 a b c"}] * 4 + [{"prompt": "p1 a"}] * 4
    trainer.current_gradient_accumulation_steps = 1  # set by the Trainer's training loop
    runs = {}
    for sharing in (True, False):
        trainer.prefix_sharing = sharing
        torch.manual_seed(1)
        batch = trainer._generate_and_score_completions(prompts)
        trainer.model.zero_grad(set_to_none=True)
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        runs[sharing] = batch, loss.detach(), grads
    assert calls == {"scoring": [True, True], "generation": [True]}  # reference and policy passes, one prefill
    (shared, shared_loss, shared_grads), (unshared, unshared_loss, unshared_grads) = runs[True], runs[False]
    assert torch.equal(shared["completion_ids"], unshared["completion_ids"])
    assert unshared["advantages"].abs().sum() > 0
    torch.testing.assert_close(shared["ref_per_token_logps"], unshared["ref_per_token_logps"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shared_loss, unshared_loss, rtol=1e-5, atol=1e-6)
    assert unshared_grads and sum(g.abs().sum() for g in unshared_grads.values()) > 0
    for n, g in unshared_grads.items():  # 1e-5 relative to the largest entry: summation order differs
        assert (shared_grads[n] - g).abs().max() <= 1e-5 * g.abs().max(), n


def test_shared_prefix_grpo_trainer_trains(tmp_path, monkeypatch):
    calls = _count_shared_passes(monkeypatch)
    tokenizer = make_tokenizer()
    trainer = SharedPrefixGRPOTrainer(
        make_model(tokenizer), completion_length_reward, args=grpo_config(tmp_path, beta=0.0, max_steps=2),
        processing_class=tokenizer, train_dataset=Dataset.from_dict({"prompt": ["p0 a b c", "p1 a"] * 4}),
    )  # fmt: skip
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert calls["generation"] == [True, True] and calls["scoring"] == [True, True]  # one policy pass a step
    moved = [n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])]
    assert len(moved) == len(before)
