"""
GRPO features beyond the plain path, used as a GRPO user would: MoE routers, reward functions that return None, tools
and environments, `rollout_func`, `mask_truncated_completions`. Tiny models built from configs, values asserted.
"""

import logging
from functools import partial

import pytest
import torch
from conftest import make_config, make_model
from datasets import Dataset

from trl_powerflow import PowerFlowTrainer


def _dataset(prompts=("p0 a", "p1 b"), n=8):
    return Dataset.from_dict({"prompt": [prompts[i % len(prompts)] for i in range(n)]})


def _snapshot(module):
    return {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}


def _assert_moved(before, module, names=None):
    moved = {name for name, p in module.named_parameters() if name in before and not torch.equal(before[name], p)}
    assert moved, "no parameter moved"
    if names is not None:
        assert set(names) <= moved, sorted(set(names) - moved)


def _logs(trainer):
    return [entry for entry in trainer.state.log_history if "loss" in entry]


# MoE: the router's load-balancing loss is added and logged as GRPO does


def _moe_model(tokenizer, family):
    from transformers import GptOssConfig, GptOssForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        num_experts_per_tok=2,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    if family == "qwen3_moe":
        config = Qwen3MoeConfig(intermediate_size=32, moe_intermediate_size=8, num_experts=4, **common)
        return Qwen3MoeForCausalLM(config)
    config = GptOssConfig(intermediate_size=8, num_local_experts=4, layer_types=["full_attention"], **common)
    return GptOssForCausalLM(config)


@pytest.mark.parametrize("family, prefix_sharing", [("qwen3_moe", True), ("gpt_oss", False)])
def test_moe_adds_the_routers_aux_loss_to_powerflows(tmp_path, tokenizer, family, prefix_sharing):
    model = _moe_model(tokenizer, family)
    args = make_config(tmp_path, router_aux_loss_coef=0.5, prefix_sharing=prefix_sharing)
    trainer = PowerFlowTrainer(model, args=args, train_dataset=_dataset(), processing_class=tokenizer)
    assert trainer.aux_loss_enabled and trainer.router_aux_loss_coef == 0.5
    before = _snapshot(model)
    trainer.train()
    router = [name for name, _ in model.named_parameters() if "router" in name or "gate.weight" in name]
    assert router
    _assert_moved(before, model, router)  # the routers learn (from the aux loss as well as the objective)
    for entry in _logs(trainer):
        # On-policy with whole groups, PowerFlow's loss is the mean squared residual; the aux loss comes on top
        assert entry["aux_loss"] > 0
        assert entry["loss"] == pytest.approx(entry["powerflow/residual_sq"] + 0.5 * entry["aux_loss"], rel=1e-4)


def test_moe_without_aux_loss_is_powerflows_loss_alone(tmp_path, tokenizer):
    args = make_config(tmp_path, router_aux_loss_coef=0.0)
    trainer = PowerFlowTrainer(
        _moe_model(tokenizer, "qwen3_moe"), args=args, train_dataset=_dataset(), processing_class=tokenizer
    )
    assert not trainer.aux_loss_enabled
    trainer.train()
    for entry in _logs(trainer):
        assert "aux_loss" not in entry
        assert entry["loss"] == pytest.approx(entry["powerflow/residual_sq"], rel=1e-4)


# Reward functions: None where a function does not apply; anything else malformed is named


def _reward_trainer(tmp_path, tokenizer, reward_funcs, **config):
    return PowerFlowTrainer(
        make_model(tokenizer),
        reward_funcs,
        args=make_config(tmp_path, max_steps=1, **config),
        train_dataset=_dataset(),
        processing_class=tokenizer,
    )


def _spy_psi(trainer):
    batches, original = [], trainer._generate_and_score_completions

    def spy(inputs):
        batches.append(original(inputs))
        return batches[-1]

    trainer._generate_and_score_completions = spy
    return batches


def test_psi_sums_the_reward_functions_that_apply(tmp_path, tokenizer, caplog):
    # `on_a` applies to completions holding "a" (reward 2), `on_b` to those holding "b" (reward -1), `never` to none
    def on_a(completions, **kwargs):
        return [2.0 if "a" in c.split() else None for c in completions]

    def on_b(completions, **kwargs):
        return [-1.0 if "b" in c.split() else None for c in completions]

    def never(completions, **kwargs):
        return [None] * len(completions)

    trainer = _reward_trainer(tmp_path, tokenizer, [on_a, on_b, never], reward_weights=[1.0, 3.0, 5.0])
    batches = _spy_psi(trainer)
    with caplog.at_level(logging.WARNING):
        trainer.train()
    batch = batches[0]
    completions = tokenizer.batch_decode(batch["completion_ids"], skip_special_tokens=True)
    expected = [2.0 * ("a" in c.split()) - 3.0 * ("b" in c.split()) for c in completions]
    assert batch["psi"].tolist() == pytest.approx(expected)
    if any("a" not in c.split() and "b" not in c.split() for c in completions):  # GRPO's warning for those rows
        assert "All reward functions returned None" in caplog.text


class _Async:
    async def __call__(self, completions, **kwargs):
        return "1.0"


def _string(completions, **kwargs):
    return ["1.0"] * len(completions)


def _scalar(completions, **kwargs):
    return 1.0


def _short(completions, **kwargs):
    return [1.0] * (len(completions) - 1)


def _nan(completions, **kwargs):
    return [float("nan")] + [1.0] * (len(completions) - 1)


def _inf(completions, **kwargs):
    return [1.0] * (len(completions) - 1) + [float("inf")]


@pytest.mark.parametrize(
    "func, match",
    [
        (_string, r"'_string' returned '1.0' \(str\) for completion 0"),
        (_scalar, r"'_scalar' returned float 1.0; it must return a list of 8 rewards"),
        (_short, r"'_short' returned 7 rewards for 8 completions"),
        (_nan, r"'_nan' returned nan for completion 0"),
        (_inf, r"'_inf' returned inf for completion 7"),
        (_Async(), r"'_Async' returned str '1.0'"),
    ],
    ids=["string", "scalar", "wrong_length", "nan", "inf", "async_string"],
)
def test_a_malformed_reward_is_an_error_naming_the_function(tmp_path, tokenizer, func, match):
    trainer = _reward_trainer(tmp_path, tokenizer, [func])
    with pytest.raises((TypeError, ValueError), match=match):
        trainer.train()


def test_a_sample_no_reward_function_applies_to_gets_psi_zero_and_grpos_warning(tmp_path, tokenizer, caplog):
    def never(completions, **kwargs):
        return [None] * len(completions)

    trainer = _reward_trainer(tmp_path, tokenizer, [never])
    batches = _spy_psi(trainer)
    with caplog.at_level(logging.WARNING):
        trainer.train()
    assert batches[0]["psi"].tolist() == [0.0] * 8
    assert "All reward functions returned None" in caplog.text
    assert torch.isfinite(torch.tensor(_logs(trainer)[0]["loss"]))


# Tools and environments: tool outputs are context, not the model's tokens


def _byte_tokenizer(eos_token, pad_token, special_tokens, chat_template):
    """A byte-level tokenizer (any text encodes, no merges) with the given special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=eos_token, pad_token=pad_token, padding_side="left"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": special_tokens})
    tokenizer.chat_template = chat_template
    return tokenizer


def _chat_tokenizer():
    """Qwen3's chat template and special tokens: tool calls parse."""
    from trl.chat_template_utils import qwen3_chat_template

    special = ["<|im_start|>", "<tool_call>", "</tool_call>", "<think>", "</think>"]
    return _byte_tokenizer("<|im_end|>", "<|endoftext|>", special, qwen3_chat_template)


def _chat_model(tokenizer):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def multiply(a: int, b: int) -> int:
    """
    Multiplies two integers.

    Args:
        a: The first integer.
        b: The second integer.
    """
    return a * b


CALL = '<tool_call>\n{"name": "multiply", "arguments": {"a": 3, "b": 4}}\n</tool_call><|im_end|>'
ANSWER = "12<|im_end|>"
AFTER_TOOL = "Done!<|im_end|>"


def _scripted_generate(tokenizer, first_turn):
    """`generate` as TRL's tests script it: the first turn's completions, then `AFTER_TOOL` after each tool result."""

    def ids(texts):
        rows = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
        width = max(len(row) for row in rows)
        return torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in rows])

    def generate(input_ids, **kwargs):
        first = input_ids.size(0) == len(first_turn)
        completions = ids(first_turn if first else [AFTER_TOOL] * input_ids.size(0))
        return torch.cat([input_ids, completions.to(input_ids.device)], dim=1)

    return generate


def _train_scripted(trainer, generate):
    from unittest.mock import patch

    batches = _spy_psi(trainer)
    with patch.object(trainer.model, "generate", side_effect=generate):
        trainer.train()
    return batches


@torch.no_grad()
def _teacher_forced_logps(model, batch):
    """log p(y_t | x, y_<t) of every completion position, the tool outputs in the context."""
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    positions = (attention_mask.cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions).logits.float()
    width = batch["completion_ids"].size(1)
    logps = torch.log_softmax(logits[:, -width - 1 : -1], dim=-1)
    return logps.gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("prefix_sharing", [False, True])
def test_tools_train_on_the_models_own_tokens_given_the_tool_outputs(tmp_path, prefix_sharing):
    import copy

    tokenizer = _chat_tokenizer()
    model = _chat_model(tokenizer)
    base = copy.deepcopy(model).eval()
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": "What is 3 times 4?"}]] * 3})
    args = make_config(
        tmp_path,
        per_device_train_batch_size=3,
        num_generations=3,
        max_completion_length=128,
        max_steps=1,
        prefix_sharing=prefix_sharing,
    )
    trainer = PowerFlowTrainer(model, args=args, train_dataset=dataset, processing_class=tokenizer, tools=[multiply])
    before = _snapshot(model)
    # Two completions call the tool (3 × 4 = 12 comes back), one answers directly
    batch = _train_scripted(trainer, _scripted_generate(tokenizer, [CALL, CALL, ANSWER]))[0]
    _assert_moved(before, model)
    log = _logs(trainer)[0]
    assert log["tools/call_frequency"] == pytest.approx(2 / 3)

    model_tokens = batch["completion_mask"] * batch["tool_mask"]
    for row, answer in zip(range(3), [CALL + AFTER_TOOL, CALL + AFTER_TOOL, ANSWER], strict=True):
        ids = batch["completion_ids"][row]
        assert tokenizer.decode(ids[model_tokens[row].bool()]) == answer
        tool_output = tokenizer.decode(ids[(batch["completion_mask"][row] * (1 - batch["tool_mask"][row])).bool()])
        assert ("<tool_response>\n12\n</tool_response>" in tool_output) == (answer != ANSWER)
    # |y| counts the model's tokens only
    lengths = model_tokens.sum(1).float()
    assert log["powerflow/completion_length"] == pytest.approx(lengths.mean().item())
    # The base log-probs of the model's tokens are conditioned on the tool outputs: a teacher-forced pass of the base
    # over prompt, completion and tool outputs; tool output tokens are left out of log p_base(y|x)
    expected = _teacher_forced_logps(base, batch)
    mask = model_tokens.bool()
    torch.testing.assert_close(batch["ref_per_token_logps"][mask], expected[mask], atol=1e-4, rtol=1e-4)
    base_logp = ((expected * model_tokens).sum(1) / lengths).mean().item()
    assert log["powerflow/base_logp"] == pytest.approx(base_logp, abs=1e-4)
    assert log["loss"] > 0


class _Calculator:
    """An environment that owns its data (the question comes from `reset`) and its reward (one per tool call)."""

    def reset(self, **kwargs):
        self.calls = 0
        return "What is 3 times 4?"

    def multiply(self, a: int, b: int) -> int:
        """
        Multiplies two integers.

        Args:
            a: The first integer.
            b: The second integer.
        """
        self.calls += 1
        return a * b

    def get_reward(self) -> float:
        return 0.5 * self.calls


@pytest.mark.parametrize("factory", ["dict", "callable"])
def test_environment_owned_data_and_reward(tmp_path, factory):
    tokenizer = _chat_tokenizer()
    model = _chat_model(tokenizer)
    if factory == "dict":  # a dataset whose only column routes each row to its environment
        dataset, environment_factory = Dataset.from_dict({"environment": ["calc"] * 3}), {"calc": _Calculator}
    else:
        dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": ""}]] * 3})
        environment_factory = _Calculator
    args = make_config(
        tmp_path,
        per_device_train_batch_size=3,
        num_generations=3,
        max_completion_length=128,
        max_steps=1,
        prefix_sharing=False,
    )
    trainer = PowerFlowTrainer(
        model, args=args, train_dataset=dataset, processing_class=tokenizer, environment_factory=environment_factory
    )
    assert trainer.reward_func_names == ["_Calculator"]  # no reward_funcs: the environment's reward is ψ
    before = _snapshot(model)
    batch = _train_scripted(trainer, _scripted_generate(tokenizer, [CALL, ANSWER, CALL]))[0]
    _assert_moved(before, model)
    prompts = tokenizer.batch_decode(batch["prompt_ids"], skip_special_tokens=False)
    assert all("What is 3 times 4?" in prompt for prompt in prompts)
    assert batch["psi"].tolist() == [0.5, 0.0, 0.5]
    assert batch["tool_mask"].min() == 0  # tool outputs are context
    assert _logs(trainer)[0]["powerflow/completion_length"] == pytest.approx(
        (batch["completion_mask"] * batch["tool_mask"]).sum(1).float().mean().item()
    )


def test_a_dataset_without_prompts_is_still_refused_without_environments(tmp_path, tokenizer):
    dataset = Dataset.from_dict({"environment": ["calc"] * 3})
    with pytest.raises(ValueError, match="no 'prompt' column.*environment_factory"):
        PowerFlowTrainer(
            make_model(tokenizer), args=make_config(tmp_path), train_dataset=dataset, processing_class=tokenizer
        )


# mask_truncated_completions: a truncated completion is out of the loss, and out of its group's log Z


def test_truncated_completions_are_left_out_of_the_loss_and_of_the_group_estimate(tmp_path, tokenizer):
    alpha = 3.0
    args = make_config(tmp_path, max_completion_length=2, max_steps=1, mask_truncated_completions=True, alpha=alpha)
    trainer = PowerFlowTrainer(make_model(tokenizer), args=args, train_dataset=_dataset(), processing_class=tokenizer)
    batches = _spy_psi(trainer)
    trainer.train()
    batch = batches[0]
    ids, mask = batch["completion_ids"], batch["completion_mask"]
    # GRPO's rule: a completion is finished when its last token is EOS or the pad token (a token like any other in
    # this vocabulary); a width-2 batch holds every length, each finished one ending in EOS then padding, or in either
    assert ids.size(1) == 2
    finished = torch.isin(ids[:, -1], torch.tensor([tokenizer.eos_token_id, tokenizer.pad_token_id]))
    assert 0 < finished.sum() < len(finished)  # both kinds in the batch
    assert (mask.sum(1) > 0).tolist() == finished.tolist()
    # On-policy at the first step the policy is the base: t = α·(1/|y|) log p − (1/|y|) log π = (α − 1)·mean log p.
    # The loss is the mean over finished sequences of (t − mean of t over the finished ones of its prompt)²
    base_mean = (batch["ref_per_token_logps"] * mask).sum(1) / mask.sum(1).clamp(min=1)
    target = (alpha - 1) * base_mean
    prompts = batch["prompt_ids"][:, -2].tolist()  # "p0 a" and "p1 b" differ in their first token
    squares = []
    for i in finished.nonzero().flatten().tolist():
        group = [j for j in finished.nonzero().flatten().tolist() if prompts[j] == prompts[i]]
        squares.append((target[i] - target[group].mean()) ** 2)
    log = _logs(trainer)[0]
    assert log["loss"] == pytest.approx(torch.stack(squares).mean().item(), rel=1e-4)
    assert log["powerflow/completion_length"] == pytest.approx(mask.sum(1)[finished].float().mean().item())


# rollout_func: the user's own rollouts are samples like any other (trajectory balance is off-policy valid)


def test_rollout_func_trains_on_its_rollouts_with_environment_tokens_masked(tmp_path, tokenizer):
    env_token = tokenizer.convert_tokens_to_ids("c")
    calls = []

    def rollout_func(prompts, trainer):
        # One model token, an environment's token (masked out with `env_mask`), one more model token
        model = trainer.accelerator.unwrap_model(trainer.model)
        prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
        input_ids = torch.tensor(prompt_ids)  # the toy prompts have equal lengths
        sample = partial(model.generate, do_sample=True, max_new_tokens=1, top_k=0)
        first = sample(input_ids=input_ids)
        second = sample(input_ids=torch.cat([first, torch.full((len(prompts), 1), env_token)], dim=1))
        completion_ids = second[:, input_ids.size(1) :].tolist()
        calls.append(len(prompts))
        return {
            "prompt_ids": prompt_ids,
            "completion_ids": completion_ids,
            "logprobs": [[0.0] * 3 for _ in prompts],  # the sampler's log-probs: PowerFlow does not read them
            "env_mask": [[1, 0, 1] for _ in prompts],
        }

    model = make_model(tokenizer)
    args = make_config(tmp_path, max_steps=2)
    trainer = PowerFlowTrainer(
        model, args=args, train_dataset=_dataset(), processing_class=tokenizer, rollout_func=rollout_func
    )
    batches = _spy_psi(trainer)
    before = _snapshot(model)
    trainer.train()
    _assert_moved(before, model)
    assert calls == [8, 8]
    batch = batches[0]
    assert (batch["completion_ids"][:, 1] == env_token).all()
    assert batch["tool_mask"].tolist() == [[1, 0, 1]] * 8
    for log in _logs(trainer):
        assert log["powerflow/completion_length"] == 2.0  # the environment's token is not the model's


# Vision-language models: both passes see the images


LLAVA_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% else %}{{ part['text'] }}{% endif %}{% endfor %}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def _llava(tokenizer):
    """A tiny LLaVA (CLIP vision tower, Llama text model) and its processor, built offline."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    image_processor = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        num_additional_image_tokens=1,  # CLIP's class token, dropped by the "default" feature selection
        vision_feature_select_strategy="default",
        chat_template=LLAVA_TEMPLATE,
    )
    vision = CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, processor


def test_a_vision_language_model_trains_with_the_images_in_both_passes(tmp_path):
    import numpy as np
    from PIL import Image

    tokenizer = _byte_tokenizer("<eos>", "<pad>", ["<image>"], LLAVA_TEMPLATE)
    model, processor = _llava(tokenizer)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (28, 28, 3), dtype=np.uint8)) for _ in range(2)]
    prompt = [{"role": "user", "content": "What is this?"}]
    dataset = Dataset.from_dict({"prompt": [prompt] * 4, "image": images * 2})
    args = make_config(tmp_path, per_device_train_batch_size=4, num_generations=2, max_completion_length=4)
    trainer = PowerFlowTrainer(model, args=args, train_dataset=dataset, processing_class=processor)
    assert trainer._is_vlm and not trainer.args.prefix_sharing  # turned off for vision-language models
    batches = _spy_psi(trainer)
    before = _snapshot(model)
    trainer.train()
    vision_layers = [name for name, _ in model.named_parameters() if "vision_tower.vision_model.encoder" in name]
    _assert_moved(before, model, vision_layers)  # the images reach the policy pass: the vision tower learns
    # At the first step the policy is the base: if either pass dropped the images, their log-probs would differ
    first = _logs(trainer)[0]
    assert first["powerflow/policy_logp"] == pytest.approx(first["powerflow/base_logp"], abs=1e-5)
    # and the base log-probs are those of a pass with the images, not without
    batch = batches[0]
    base = trainer.ref_model
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    width, mask = batch["completion_ids"].size(1), batch["completion_mask"].bool()

    @torch.no_grad()
    def logps(**images):
        logits = base(input_ids=input_ids, attention_mask=attention_mask, **images).logits[:, -width - 1 : -1]
        return torch.log_softmax(logits.float(), -1).gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)

    with_images = logps(pixel_values=batch["pixel_values"])
    torch.testing.assert_close(batch["ref_per_token_logps"][mask], with_images[mask], atol=1e-4, rtol=1e-4)
    # (without the images, the image tokens are read as plain tokens: other log-probs)
    assert not torch.allclose(with_images[mask], logps()[mask], atol=1e-3)


def test_a_reward_model_gives_psi(tmp_path, tokenizer):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(1)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    reward_model = LlamaForSequenceClassification(config)
    trainer = PowerFlowTrainer(
        make_model(tokenizer),
        reward_model,
        args=make_config(tmp_path, max_steps=1),
        train_dataset=_dataset(),
        processing_class=tokenizer,
        reward_processing_classes=tokenizer,
    )
    batches = _spy_psi(trainer)
    trainer.train()
    batch = batches[0]
    prompts = tokenizer.batch_decode(batch["prompt_ids"], skip_special_tokens=True)
    completions = tokenizer.batch_decode(batch["completion_ids"], skip_special_tokens=True)
    texts = [p + c for p, c in zip(prompts, completions, strict=True)]
    inputs = tokenizer(texts, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False)
    with torch.no_grad():
        expected = reward_model(**inputs).logits[:, 0]
    torch.testing.assert_close(batch["psi"], expected, atol=1e-5, rtol=1e-5)

    # A reward model has no None to give: NaN there is a fault
    reward_model.score.weight.data.fill_(float("nan"))
    trainer = PowerFlowTrainer(
        make_model(tokenizer),
        reward_model,
        args=make_config(tmp_path, max_steps=1),
        train_dataset=_dataset(),
        processing_class=tokenizer,
        reward_processing_classes=tokenizer,
    )
    with pytest.raises(ValueError, match="reward model '.*' returned NaN or inf"):
        trainer.train()


def test_environment_without_dataset(tmp_path):
    # GRPO drives the loop with placeholder prompts when the environment owns the data and there is no dataset
    tokenizer = _chat_tokenizer()
    model = _chat_model(tokenizer)
    args = make_config(
        tmp_path,
        per_device_train_batch_size=3,
        num_generations=3,
        max_completion_length=128,
        max_steps=1,
        prefix_sharing=False,
    )
    trainer = PowerFlowTrainer(
        model, args=args, train_dataset=None, processing_class=tokenizer, environment_factory=_Calculator
    )
    before = _snapshot(model)
    batch = _train_scripted(trainer, _scripted_generate(tokenizer, [CALL, ANSWER, CALL]))[0]
    _assert_moved(before, model)
    assert batch["psi"].tolist() == [0.5, 0.0, 0.5]


def test_rewards_as_grpo_takes_them(tmp_path, tokenizer):
    # Booleans, numpy values and arrays, tensors: GRPO takes them all, so does PowerFlow
    import numpy as np

    def as_bools(completions, **kwargs):
        return [len(c.split()) > 1 for c in completions]

    def as_array(completions, **kwargs):
        return np.full(len(completions), 0.25)

    def as_tensor(completions, **kwargs):
        return torch.full((len(completions),), np.float32(0.5))

    trainer = _reward_trainer(tmp_path, tokenizer, [as_bools, as_array, as_tensor])
    batches = _spy_psi(trainer)
    trainer.train()
    completions = tokenizer.batch_decode(batches[0]["completion_ids"], skip_special_tokens=True)
    expected = [float(len(c.split()) > 1) + 0.75 for c in completions]
    assert batches[0]["psi"].tolist() == pytest.approx(expected)
