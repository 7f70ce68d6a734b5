"""The capitals task of elicitation.py, length_ablation.py and alpha_selection.py: unlabeled capital questions to
train on (train split), held-out ones (test split) to measure avg@k on, matcher "contains" against the answer and its
aliases."""


def questions(args):
    """The capital questions: the train split (its first `args.num_train_prompts` where the script
    has that flag and it is set) and the first `args.num_eval_prompts` of the test split. Returns `(train, test)`."""
    from trl_powerflow.prompt_sets import load_prompt_set

    train = load_prompt_set("capitals", split="train", kinds=["capital"])
    if getattr(args, "num_train_prompts", None):
        train = train.select(range(min(args.num_train_prompts, len(train))))
    test = load_prompt_set("capitals", split="test", kinds=["capital"])
    return train, test.select(range(min(args.num_eval_prompts, len(test))))


def evaluate(model, tokenizer, test, args, seed, temperature=1.0, batch_size=64, progress=True) -> dict:
    """Samples `args.k` answers per capital question of `test` and scores them (see `summarize`)."""
    from trl_powerflow.evaluation import generate_samples

    out = generate_samples(
        model,
        tokenizer,
        test["prompt"],
        num_samples=args.k,
        max_new_tokens=args.max_completion_length,
        temperature=temperature,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
    )
    return summarize(out, test)


def summarize(out, test) -> dict:
    """avg@k (matcher "contains" against the answer and its aliases), per question, mean length and forward tokens."""
    from trl_powerflow.evaluation import avg_at_k, score_samples

    answers = [[row["answer"], *row["aliases"]] for row in test]
    correct = score_samples(out.texts, answers, matcher="contains")
    lengths = [n for row in out.num_tokens for n in row]
    return {
        "avg_at_k": avg_at_k(correct),
        "per_prompt": [sum(row) / len(row) for row in correct],  # for paired comparisons / bootstrap
        "mean_length": sum(lengths) / len(lengths),
        "forward_tokens": out.forward_tokens,
        "examples": [out.texts[i][:3] for i in range(min(3, len(out.texts)))],
    }
