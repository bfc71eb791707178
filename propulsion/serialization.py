"""Save and load a Propulsion adapter: safetensors for the tensors, JSON for the config.

An adapter folder holds ``adapter_config.json`` (format, config, wrapped modules, tensor shapes,
sha256 of the tensor file, and ``content_sha256``: the sha256 of all its other entries) and
``adapter_model.safetensors`` (only the trained tensors). A config or tensor file that was
edited or damaged is refused at load, naming the file. No pickle is ever read or written. Both
files are written atomically (temporary file, then rename).

Format versions: 2 (this one) seals the config; 1 (earlier releases) checked the tensor file
only, and is still read, with a warning that its config cannot be verified.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from propulsion.config import PropulsionConfig
from propulsion.errors import (
    AdapterFileError,
    AdapterMismatchError,
    PropulsionConfigError,
    PropulsionError,
)
from propulsion.model import (
    _state,
    adapter_state,
    get_propulsion_model,
    is_propulsion_model,
    propulsion_layers,
    unload,
)

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "load_adapter", "save_adapter"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "propulsion-ntk-adapter"
FORMAT_VERSION = 2
_READABLE_VERSIONS = (1, 2)
_SEAL = "content_sha256"  # sha256 of the config file's other entries, as canonical JSON


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _content_sha256(meta: dict[str, Any]) -> str:
    """sha256 of ``meta`` without its seal, as canonical JSON (sorted keys, no spaces), so the
    seal holds whatever the file's layout and covers the config and the tensor checksum."""
    body = {key: value for key, value in meta.items() if key != _SEAL}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _atomic_target(folder: Path, name: str) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    return Path(tmp)


def save_adapter(model: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Write the adapter of a wrapped model to the folder ``path`` (created if needed).

    Raises:
        PropulsionError: the model is not wrapped, is merged, or holds non-finite values.
    """
    state = _state(model, "save the adapter")
    if any(layer.merged for layer in propulsion_layers(model).values()):
        raise PropulsionError(
            "the adapter is merged into the base weights; call unmerge_adapter(model) first"
        )
    tensors = {
        name: t.detach().to("cpu").contiguous() for name, t in adapter_state(model).items()
    }
    bad = [name for name, t in tensors.items() if not bool(torch.isfinite(t).all())]
    if bad:
        raise PropulsionError(f"refusing to save non-finite adapter tensors: {bad[:5]}")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    weights_tmp = _atomic_target(folder, WEIGHTS_NAME)
    config_tmp = _atomic_target(folder, CONFIG_NAME)
    try:
        save_file(tensors, str(weights_tmp), metadata={"format": FORMAT})
        meta: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "config": state.config.to_dict(),
            "wrapped_modules": state.wrapped,
            "modules_to_save": state.saved,
            "tensors": {name: list(t.shape) for name, t in tensors.items()},
            "model_class": type(model).__name__,
            "weights_sha256": _sha256(weights_tmp),
        }
        meta[_SEAL] = _content_sha256(meta)
        config_tmp.write_text(json.dumps(meta, indent=2))
        os.replace(weights_tmp, folder / WEIGHTS_NAME)
        os.replace(config_tmp, folder / CONFIG_NAME)
    finally:
        weights_tmp.unlink(missing_ok=True)
        config_tmp.unlink(missing_ok=True)
    return folder


_RESAVE = (
    "restore the adapter folder from a copy, or save the adapter again with save_adapter "
    "(adapter files must not be edited by hand)"
)


def _read_meta(folder: Path) -> dict[str, Any]:
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        raise AdapterFileError(f"{config_file} is missing: {folder} is not a Propulsion adapter")
    try:
        meta = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterFileError(
            f"{config_file} is corrupt (not valid JSON): {exc}; {_RESAVE}"
        ) from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise AdapterFileError(f"{config_file} is not a {FORMAT} file")
    version = meta.get("format_version")
    if version not in _READABLE_VERSIONS:
        raise AdapterFileError(
            f"{config_file} has format version {version!r}; this toolkit reads versions "
            f"{', '.join(map(str, _READABLE_VERSIONS))}"
        )
    required = ("config", "weights_sha256", "tensors") + ((_SEAL,) if version >= 2 else ())
    for key in required:
        if key not in meta:
            raise AdapterFileError(
                f"{config_file} is corrupt: the entry {key!r} is missing; {_RESAVE}"
            )
    if version >= 2:
        try:
            sealed = _content_sha256(meta) == meta[_SEAL]
        except ValueError:  # NaN or infinity written into the file
            sealed = False
        if not sealed:
            raise AdapterFileError(
                f"{config_file} was edited or is damaged: its entries do not match the "
                f"checksum it holds ({_SEAL}), so its config cannot be trusted; {_RESAVE}"
            )
    else:
        warnings.warn(
            f"{config_file} was written by an earlier version (format 1) whose checksum covers "
            "the tensor file only, so an edit of its config cannot be detected; load it and "
            "save it again with save_adapter to protect it",
            UserWarning,
            stacklevel=3,
        )
    if not isinstance(meta["config"], dict) or not isinstance(meta["tensors"], dict):
        raise AdapterFileError(f"{config_file} is corrupt: 'config' and 'tensors' must be objects")
    return meta


def _read_tensors(folder: Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    weights_file = folder / WEIGHTS_NAME
    if not weights_file.is_file():
        raise AdapterFileError(f"{weights_file} is missing; {_RESAVE}")
    if _sha256(weights_file) != meta.get("weights_sha256"):
        raise AdapterFileError(
            f"{weights_file} does not match the checksum in {CONFIG_NAME}: the file is damaged, "
            f"was edited, or belongs to another adapter; {_RESAVE}"
        )
    try:
        tensors = load_file(str(weights_file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterFileError(f"{weights_file} is corrupt: {exc}; {_RESAVE}") from exc
    bad = [name for name, t in tensors.items() if not bool(torch.isfinite(t).all())]
    if bad:
        raise AdapterFileError(f"{weights_file} holds non-finite values in {bad[:5]}; {_RESAVE}")
    listed = meta["tensors"]
    held = {name: list(t.shape) for name, t in tensors.items()}
    if listed != held:
        differ = sorted(set(listed) ^ set(held)) or sorted(n for n in listed if listed[n] != held[n])
        raise AdapterFileError(
            f"{weights_file} does not hold the tensors {CONFIG_NAME} lists (they differ in "
            f"{differ[:5]}); {_RESAVE}"
        )
    return tensors


def load_adapter(base_model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Wrap ``base_model`` with the saved config and load the saved tensors into it.

    Raises:
        AdapterFileError: a file is missing, damaged, edited by hand (the config is sealed by
            a checksum, the tensor file by another), or of another format; the message names
            the file.
        AdapterMismatchError: module names or shapes do not match the model; the model is left
            unwrapped and unchanged.
    """
    folder = Path(path)
    meta = _read_meta(folder)
    tensors = _read_tensors(folder, meta)
    if is_propulsion_model(base_model):
        raise PropulsionError("the model is already wrapped; load into the plain base model")
    try:
        config = PropulsionConfig.from_dict(meta["config"])
    except (PropulsionConfigError, TypeError) as exc:
        raise AdapterFileError(f"{folder / CONFIG_NAME} holds an invalid config: {exc}") from exc
    try:
        model = get_propulsion_model(base_model, config)
    except PropulsionError as exc:
        raise AdapterMismatchError(f"the adapter in {folder} does not fit this model: {exc}") from exc
    expected = adapter_state(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [
        f"{name}: file {tuple(tensors[name].shape)} vs model {tuple(expected[name].shape)}"
        for name in sorted(set(expected) & set(tensors))
        if tensors[name].shape != expected[name].shape
    ]
    if missing or unexpected or wrong:
        unload(model)
        raise AdapterMismatchError(
            f"the adapter in {folder} does not match this model: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}, "
            f"wrong shapes {wrong[:5]}"
        )
    wrapped = _state(model, "load the adapter").wrapped
    if meta.get("wrapped_modules", wrapped) != wrapped:
        unload(model)
        raise AdapterMismatchError(
            f"the adapter in {folder} wrapped the modules {meta['wrapped_modules'][:5]}..., but "
            f"its config selects {wrapped[:5]}... in this model; load it into the model it was "
            "trained on"
        )
    with torch.no_grad():
        for name, param in expected.items():
            param.copy_(tensors[name].to(device=param.device, dtype=param.dtype))
    return model
