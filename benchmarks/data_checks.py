"""Cost of the one pass over the prompts that runs before any model loads (`trl_powerflow.data_checks`).

For `--rows` prompts in each layout (a string column, a list of {role, content} structs, datasets' JSON type that
holds rows of mixed types), times the format pass alone and with the prompt-length check, with the embedded SmolLM2
tokenizer and its chat template when it is converted (else the tests' word-level one): once with SmolLM2's budget
(8192 positions less 512 for the completion), where a prompt short enough in bytes is not tokenized, and once with a
budget between the prompts' token and byte lengths, so that every prompt is tokenized and none refused. Then
`trl-powerflow`'s loading of a `.jsonl` file of that size (UTF-8 pass, `load_dataset`, format pass).

    python benchmarks/data_checks.py --rows 100000
"""

import argparse
import json
import os
import tempfile
import time


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    args = parser.parse_args()

    import datasets
    from datasets import Dataset, Features, Json
    from transformers import AutoTokenizer

    from trl_powerflow.cli.data import PowerFlowScriptArguments, load_prompts
    from trl_powerflow.data_checks import check_prompts
    from trl_powerflow.models import embedded_model_cache_dir, is_converted
    from trl_powerflow.testing import make_tokenizer

    datasets.disable_progress_bars()
    smollm2 = embedded_model_cache_dir("smollm2-135m")
    if is_converted(smollm2):
        tokenizer, tokenizer_name = AutoTokenizer.from_pretrained(smollm2), "SmolLM2"
    else:
        tokenizer, tokenizer_name = make_tokenizer(), "word-level test tokenizer"
    texts = [f"What is the capital of country number {i}? Answer in one word." for i in range(args.rows)]
    conversations = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": t}] for t in texts]
    layouts = {
        "string column": Dataset.from_dict({"prompt": texts}),
        "{role, content} structs": Dataset.from_dict({"prompt": conversations}),
        "JSON type": Dataset.from_dict({"prompt": texts}, features=Features({"prompt": Json()})),
    }
    print(f"{args.rows} rows; lengths tokenized with the {tokenizer_name}\n")
    print("| layout | format pass (s) | + lengths, budget 7680 (s) | + lengths, every prompt tokenized (s) |")
    print("|---|---|---|---|")
    for name, dataset in layouts.items():
        seconds = []
        for budget in (None, 8192 - 512, 40):
            start = time.perf_counter()
            check_prompts(dataset, tokenizer=tokenizer, max_prompt_tokens=budget, limit_reason="benchmark")
            seconds.append(f"{time.perf_counter() - start:.2f}")
        print(f"| {name} | {' | '.join(seconds)} |")

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "prompts.jsonl")
        with open(path, "w") as f:
            f.writelines(json.dumps({"prompt": c}) + "\n" for c in conversations)
        os.environ["HF_DATASETS_CACHE"] = os.path.join(folder, "cache")  # no earlier run's cache
        start = time.perf_counter()
        load_prompts(PowerFlowScriptArguments(dataset_name=path), "train")
        print(f"\nCLI loading of a {args.rows}-row .jsonl of conversations: {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
