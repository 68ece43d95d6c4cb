"""Loading checkpoints for a task, mapping tensor names, and saving fine-tuned folders."""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from weightsmith.errors import CheckpointError, DataError
from weightsmith.finetune._deps import quiet_transformers, require_transformers
from weightsmith.finetune.data import check_task

# Files a tokenizer may consist of; copied verbatim so the output tokenizes exactly like the base.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    new_head: bool  # a classification head was created because the checkpoint had none


def check_model_dir(path: str | Path, what: str = "model") -> Path:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: {what} folder not found")
    if not (path / "config.json").is_file():
        raise CheckpointError(
            f"{path}: not a transformers checkpoint folder (no config.json); "
            "expected the output of save_pretrained"
        )
    return path


def has_classification_head(config) -> bool:
    return any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))


def _dtype_kwargs(transformers) -> dict[str, torch.dtype]:
    # transformers renamed torch_dtype to dtype in 4.56; we always train and score in float32.
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": torch.float32} if (major, minor) >= (4, 56) else {"torch_dtype": torch.float32}


def load_tokenizer(model_dir: Path):
    transformers = require_transformers()
    try:
        with quiet_transformers():
            return transformers.AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{model_dir}: cannot load a tokenizer ({err})") from None


def model_config(model_dir: Path):
    transformers = require_transformers()
    try:
        return transformers.AutoConfig.from_pretrained(str(model_dir))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{model_dir}: cannot read config.json ({err})") from None


def load_model(
    model_dir: str | Path,
    task: str,
    num_labels: int | None = None,
    seed: int = 0,
    require_head: bool = False,
    tokenizer_dir: str | Path | None = None,
) -> LoadedModel:
    """Build the task model from ``model_dir`` in float32.

    Classification: a checkpoint without a sequence-classification head (e.g. a bare BertModel)
    gets a new head with ``num_labels`` outputs, initialised from ``seed`` so runs reproduce.
    """
    check_task(task)
    transformers = require_transformers()
    model_dir = check_model_dir(model_dir)
    tokenizer = load_tokenizer(Path(tokenizer_dir) if tokenizer_dir else model_dir)
    config = model_config(model_dir)
    kwargs = _dtype_kwargs(transformers)
    new_head = False
    if task == "classification":
        auto = transformers.AutoModelForSequenceClassification
        # An existing head keeps its size; callers check labels against it line by line.
        if not has_classification_head(config):
            if require_head:
                raise CheckpointError(
                    f"{model_dir}: has no sequence-classification head (architectures: "
                    f"{config.architectures}); evaluate a fine-tuned folder instead"
                )
            if num_labels is None or num_labels < 2:
                raise DataError(f"classification needs at least 2 classes to size a new head for {model_dir}")
            kwargs["num_labels"] = num_labels
            new_head = True
    else:
        auto = transformers.AutoModelForCausalLM
    try:
        # fork_rng: seeding the head init must not disturb the caller's global RNG stream.
        with torch.random.fork_rng(devices=[]), quiet_transformers():
            torch.manual_seed(seed)
            model = auto.from_pretrained(str(model_dir), **kwargs)
    except (OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{model_dir}: cannot load as a {task} model ({err})") from None
    if task == "causal-lm" and model.config.pad_token_id is None:
        from weightsmith.finetune.encoding import pad_id

        model.config.pad_token_id = pad_id(tokenizer)
    return LoadedModel(model=model, tokenizer=tokenizer, new_head=new_head)


class KeyResolver:
    """Maps external tensor names onto a model's state-dict keys.

    A bare backbone checkpoint names tensors ``encoder.layer.0...`` while the task model calls them
    ``bert.encoder.layer.0...``; both spellings are accepted so merged backbones load directly.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.keys = set(model.state_dict().keys())
        self.prefix = getattr(model, "base_model_prefix", "") or ""

    def resolve(self, name: str) -> str | None:
        if name in self.keys:
            return name
        if self.prefix:
            prefixed = f"{self.prefix}.{name}"
            if prefixed in self.keys:
                return prefixed
            head = f"{self.prefix}."
            if name.startswith(head) and name[len(head) :] in self.keys:
                return name[len(head) :]
        return None


def load_weights(
    model: torch.nn.Module, tensors: Iterable[tuple[str, torch.Tensor]], source: str
) -> set[str]:
    """Load named tensors with ``load_state_dict``, strict on the names provided.

    Every provided name must exist in the model with the same shape; model tensors that are not
    provided keep their current values. Returns the model keys that were loaded.
    """
    resolver = KeyResolver(model)
    mapped: dict[str, torch.Tensor] = {}
    for name, tensor in tensors:
        key = resolver.resolve(name)
        if key is None:
            raise CheckpointError(f"{source}: tensor {name!r} does not exist in the model")
        mapped[key] = tensor
    expected = model.state_dict()
    for key, tensor in mapped.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{source}: tensor {key!r} has shape {tuple(tensor.shape)}, the model expects "
                f"{tuple(expected[key].shape)} (different architecture?)"
            )
    model.load_state_dict(mapped, strict=False)
    return set(mapped)


def safetensors_files(model_dir: Path) -> list[Path]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{model_dir}: no *.safetensors weights found")
    return files


def iter_safetensors(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    for file in safetensors_files(model_dir):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)


def checkpoint_names(model: torch.nn.Module, model_dir: Path) -> dict[str, str]:
    """For each model key, the name the same tensor has in ``model_dir``'s safetensors files.

    Results keyed this way line up with what weight-level tools read from disk. Tensors absent
    from the files (a freshly created head) keep the model's own name.
    """
    file_keys: set[str] = set()
    for file in safetensors_files(model_dir):
        with safe_open(str(file), framework="pt") as f:
            file_keys.update(f.keys())
    prefix = (getattr(model, "base_model_prefix", "") or "") + "."
    names = {}
    for key in model.state_dict():
        if key not in file_keys and key.startswith(prefix) and key[len(prefix) :] in file_keys:
            names[key] = key[len(prefix) :]
        else:
            names[key] = key
    return names


def save_model(model: torch.nn.Module, tokenizer, tokenizer_dir: Path, out_dir: Path) -> None:
    """save_pretrained (safetensors) plus the tokenizer files copied byte-for-byte."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with quiet_transformers():
        model.save_pretrained(str(out_dir))
    copied = 0
    for name in TOKENIZER_FILES:
        src = tokenizer_dir / name
        if src.is_file():
            shutil.copyfile(src, out_dir / name)
            copied += 1
    if not copied:  # tokenizer came from somewhere exotic: let transformers write its files
        tokenizer.save_pretrained(str(out_dir))
