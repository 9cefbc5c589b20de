"""Checkpoint adapters: the weights of a trained denoiser from the files researchers actually save.

Every file is read with ``torch.load(..., weights_only=True)`` (no pickled code is ever run). Accepted layouts:

- a bare ``state_dict`` (``torch.save(net.state_dict(), ...)``), e.g. MONAI ``DiffusionModelUNet`` keys without
  our wrapper's ``net.`` prefix;
- a dict holding it: ours ``{"model": state, ...}``, Lightning ``{"state_dict": {"model.…": …}}``, or
  ``model_state_dict``, ``net``, ``network``, ``module``, ``weights``;
- DDP (``module.``) and any other prefix, found by matching the key set against the built model's
  ``state_dict()`` keys: a prefix is removed (and/or the prefix every model key shares, such as ``net.``, added)
  only when that makes the two key sets equal; otherwise the error names the file and the first keys that differ;
- EMA weights, picked with ``weights="ema"`` (``diffseg export --weights ema``): under ``ema``, ``ema_state_dict``,
  ``model_ema``, ``ema_model`` or ``state_dict_ema`` (timm), or as keys under ``ema.``, ``ema_model.``,
  ``model_ema.`` (ema-pytorch's ``EMA`` wrapper keeps ``online_model.`` and ``ema_model.``).

Refused with the one-line fix: a pickled module (``torch.save(model)``), a TorchScript archive, a file holding
non-tensor objects that ``weights_only`` refuses, and tensors whose shapes differ from the built model's.
"""

from __future__ import annotations

import logging
import pickletools
import re
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .architectures import build_model

__all__ = [
    "EMA_CONTAINERS",
    "EMA_PREFIXES",
    "MODEL_CONTAINERS",
    "WEIGHT_CHOICES",
    "CheckpointError",
    "CheckpointWeights",
    "load_checkpoint",
    "load_weights",
    "read_checkpoint",
    "select_weights",
]

logger = logging.getLogger("diffseg.export")

WEIGHT_CHOICES = ("model", "ema")
#: Keys of a checkpoint dict that hold the (non-EMA) network weights, in order of preference.
MODEL_CONTAINERS = ("model", "state_dict", "model_state_dict", "net", "network", "module", "weights")
#: Keys of a checkpoint dict that hold EMA weights.
EMA_CONTAINERS = ("ema", "ema_state_dict", "model_ema", "ema_model", "state_dict_ema")
#: Key prefixes that mark EMA copies inside one state dict (Lightning modules that keep an EMA submodule).
EMA_PREFIXES = ("ema.", "ema_model.", "model_ema.")
_SHOW = 5  # keys shown per list in an error


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded into the configured model; the message names the file and what to do."""


@dataclass(frozen=True)
class CheckpointWeights:
    """The weights picked from a checkpoint, renamed to the model's keys, and where they came from.

    Attributes:
        path: the checkpoint file.
        state_dict: the tensors under the model's own ``state_dict()`` keys.
        weights: ``model`` or ``ema``.
        source: where in the file they were found (e.g. ``['state_dict'] keys under 'ema_model.'``).
        removed_prefix: the prefix removed from the checkpoint's keys ('' for none).
        added_prefix: the prefix added to them ('' for none; ``net.`` for a bare MONAI network in our wrapper).
        ignored: checkpoint keys outside the removed prefix, not loaded (e.g. a loss module's buffers).
        alternatives: the other weight choice when the file also holds it (``ema`` or ``model``), else None.
    """

    path: Path
    state_dict: dict[str, torch.Tensor]
    weights: str
    source: str
    removed_prefix: str = ""
    added_prefix: str = ""
    ignored: tuple[str, ...] = ()
    alternatives: str | None = None

    def describe(self) -> str:
        """One line for logs and the CLI: which weights, from where, with which renaming."""
        parts = [f"{self.weights} weights from {self.path.name}{self.source}"]
        if self.removed_prefix:
            parts.append(f"prefix {self.removed_prefix!r} removed")
        if self.added_prefix:
            parts.append(f"prefix {self.added_prefix!r} added")
        if self.ignored:
            parts.append(f"{len(self.ignored)} other tensors not loaded ({_first(self.ignored)})")
        if self.alternatives:
            parts.append(f"{self.alternatives} weights also present (--weights {self.alternatives})")
        return "; ".join(parts)

    def as_provenance(self) -> dict[str, Any]:
        """What the manifest's provenance records about the checkpoint."""
        return {"file": self.path.name, "weights": self.weights, "source": self.source.strip() or "top level"}


def _first(keys: Any, n: int = _SHOW) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:n])
    return shown + (f", … ({len(keys)} in all)" if len(keys) > n else "")


def _pickled_object(path: Path) -> str | None:
    """The class of the checkpoint's top-level object when it is a pickled object (not a dict/list of tensors),
    read from the pickle's opcodes without unpickling anything; None otherwise or when it cannot be told."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith("data.pkl")]
            data = archive.read(names[0]) if names else b""
    except (OSError, zipfile.BadZipFile):
        return None
    strings: list[str] = []
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("PROTO", "FRAME", "MEMOIZE", "BINPUT", "LONG_BINPUT"):
                continue
            if op.name == "GLOBAL":
                return str(arg).replace(" ", ".")
            if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE") and len(strings) < 2:
                strings.append(str(arg))  # protocol 4+: module and name pushed before STACK_GLOBAL
                continue
            if op.name == "STACK_GLOBAL" and len(strings) == 2:
                return ".".join(strings)
            return None
    except Exception:  # a damaged pickle: torch's own error says so
        return None
    return None


def read_checkpoint(path: str | Path) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with errors that say what to do.

    Args:
        path: the checkpoint file.

    Returns:
        The loaded object (a dict of tensors, or of dicts of tensors and plain values).

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: a pickled module, a TorchScript archive, objects that ``weights_only`` refuses, or not a
            PyTorch file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*TorchScript archive.*")  # refused below, with the fix
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # every failure of torch.load becomes one explained error
        message = str(exc)
        if "TorchScript" in message or _is_torchscript(path):
            raise CheckpointError(
                f"{path} is a TorchScript archive (torch.jit.save), not a state_dict; save the eager model's "
                f"weights instead: torch.save(model.state_dict(), 'ckpt.pt')"
            ) from None
        name = _pickled_object(path)
        if name is not None:
            raise CheckpointError(
                f"{path} holds a pickled module ({name}), not a state_dict; save "
                f"model.state_dict() instead: torch.save(model.state_dict(), 'ckpt.pt')"
            ) from None
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", message)
        if found:
            what = f" ({found.group(1)})"
            raise CheckpointError(
                f"{path} holds Python objects besides tensors{what} that weights_only=True refuses to unpickle "
                f"(diffseg never runs pickled code); save only the weights: torch.save(model.state_dict(), "
                f"'ckpt.pt') (for Lightning: torch.save(ckpt['state_dict'], 'ckpt.pt'))"
            ) from None
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", message)  # the line that says why, not torch's advice
        first = detail.group(1) if detail else (message.strip().splitlines()[0] if message.strip() else "")
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint that torch.load can read ({type(exc).__name__}: {first}); save "
            f"the weights with torch.save(model.state_dict(), 'ckpt.pt')"
        ) from None


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return any(n.endswith("constants.pkl") or "/code/" in n for n in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _tensors_of(obj: Any) -> dict[str, torch.Tensor] | None:
    """The tensors of a state dict (a mapping of tensors, perhaps with a few plain counters such as an EMA's
    ``num_updates``), or None when ``obj`` is not one."""
    if not isinstance(obj, Mapping) or any(isinstance(v, Mapping | list | tuple) for v in obj.values()):
        return None
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    return tensors or None


def _candidates(obj: Any) -> list[tuple[str, str, dict[str, torch.Tensor]]]:
    """Every ``(kind, source, state_dict)`` found in the file, kind ``model`` or ``ema``, in order of preference."""
    found: list[tuple[str, str, dict[str, torch.Tensor]]] = []

    def split(source: str, state: Mapping[str, torch.Tensor], kind: str) -> None:
        rest = dict(state)
        for prefix in EMA_PREFIXES:
            part = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            if part:
                found.append(("ema", f"{source} keys under {prefix!r}", part))
                for k in list(rest):
                    if k.startswith(prefix):
                        del rest[k]
        if rest:
            found.append((kind, source, rest))

    def visit(node: Any, source: str, kind: str, depth: int) -> None:
        tensors = _tensors_of(node)
        if tensors is not None:
            split(source, tensors, kind)
            return
        if not isinstance(node, Mapping) or depth > 1:
            return
        for key in MODEL_CONTAINERS:
            if key in node:
                visit(node[key], f"{source}[{key!r}]", kind, depth + 1)
        for key in EMA_CONTAINERS:
            if key in node:
                visit(node[key], f"{source}[{key!r}]", "ema", depth + 1)

    visit(obj, "", "model", 0)
    return found


def _dotted_prefixes(keys: Any) -> set[str]:
    out = {""}
    for key in keys:
        parts = key.split(".")
        out.update(".".join(parts[:i]) + "." for i in range(1, len(parts)))
    return out


def _common_prefixes(keys: list[str]) -> list[str]:
    """Dotted prefixes shared by every key (``''`` first)."""
    out = [""]
    if not keys:
        return out
    parts = keys[0].split(".")
    for i in range(1, len(parts)):
        p = ".".join(parts[:i]) + "."
        if all(k.startswith(p) for k in keys):
            out.append(p)
    return out


def _rename(state: Mapping[str, torch.Tensor], strip: str, add: str) -> dict[str, torch.Tensor]:
    return {add + k[len(strip) :]: v for k, v in state.items() if k.startswith(strip)}


def _match(state: Mapping[str, torch.Tensor], target: list[str]) -> tuple[list[tuple[str, str]], tuple[str, str], int]:
    """The (strip, add) renamings that make ``state``'s keys equal ``target``, and the best partial one."""
    want = set(target)
    matches, best, best_score = [], ("", ""), -1
    used: set[frozenset[str]] = set()  # renamings that take the same keys are one (e.g. strip 'net.', add 'net.')
    adds = _common_prefixes(target)
    for strip in sorted(_dotted_prefixes(state), key=lambda p: (len(p), p)):
        for add in adds:
            keys = {add + k[len(strip) :] for k in state if k.startswith(strip)}
            if keys == want:
                taken = frozenset(k for k in state if k.startswith(strip))
                if taken not in used:
                    used.add(taken)
                    matches.append((strip, add))
            score = len(keys & want) - len(keys - want)
            if score > best_score:
                best, best_score = (strip, add), score
    return matches, best, best_score


def select_weights(obj: Any, model: torch.nn.Module, path: str | Path, weights: str = "model") -> CheckpointWeights:
    """Pick the weights of kind ``weights`` from a loaded checkpoint and rename them to ``model``'s keys.

    Args:
        obj: what :func:`read_checkpoint` returned.
        model: the built (untrained) network; only its ``state_dict()`` keys and shapes are read.
        path: the file, for messages.
        weights: ``model`` (the trained network) or ``ema`` (its exponential moving average).

    Returns:
        The renamed state dict and where it came from.

    Raises:
        ValueError: ``weights`` is not one of :data:`WEIGHT_CHOICES`.
        CheckpointError: no weights of that kind, keys that no renaming matches, or shapes that differ.
    """
    if weights not in WEIGHT_CHOICES:
        raise ValueError(f"weights must be one of {WEIGHT_CHOICES}, got {weights!r}")
    path = Path(path)
    cls = type(model).__name__
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__}, not a state_dict; save the network's weights: "
            f"torch.save(model.state_dict(), 'ckpt.pt')"
        )
    found = _candidates(obj)
    kinds = {kind for kind, _, _ in found}
    chosen = [(source, state) for kind, source, state in found if kind == weights]
    if not chosen:
        if weights == "ema":
            raise CheckpointError(
                f"{path} holds no EMA weights (looked for keys {list(EMA_CONTAINERS)} and key prefixes "
                f"{list(EMA_PREFIXES)}); use --weights model"
            )
        if "ema" in kinds:
            raise CheckpointError(f"{path} holds only EMA weights; pass --weights ema to load them")
        top = [str(k) for k in list(obj)[:8]]
        raise CheckpointError(
            f"{path} holds no tensors the diffseg adapters know where to find (top-level keys: {top}); save the "
            f"network's weights: torch.save(model.state_dict(), 'ckpt.pt')"
        )
    target = dict(model.state_dict())
    target_keys = list(target)
    report = None
    for source, state in chosen:
        matches, best, score = _match(state, target_keys)
        full = [m for m in matches if not [k for k in state if not k.startswith(m[0])]]
        pick = full or matches
        if len(pick) > 1:
            raise CheckpointError(
                f"{path}: the weights in{source or ' the top level'} match {cls} under several prefixes "
                f"{[s for s, _ in pick]}; save the one network's state_dict alone"
            )
        if pick:
            strip, add = pick[0]
            renamed = _rename(state, strip, add)
            _check_shapes(path, cls, renamed, target)
            ignored = tuple(k for k in state if not k.startswith(strip))
            other = next((k for k in ("ema", "model") if k != weights and k in kinds), None)
            return CheckpointWeights(path, renamed, weights, source, strip, add, ignored, other)
        if report is None or score > report[0]:
            report = (score, source, state, best)
    _, source, state, (strip, add) = report or (0, "", {}, ("", ""))
    got = set(_rename(state, strip, add))
    missing = [k for k in target_keys if k not in got]
    unexpected = [add + k[len(strip) :] for k in state if k.startswith(strip) and add + k[len(strip) :] not in target]
    renaming = ", ".join(
        s for s in (f"prefix {strip!r} removed" if strip else "", f"prefix {add!r} added" if add else "") if s
    )
    raise CheckpointError(
        f"{path}: the {weights} weights in{source or ' the top level'} do not match {cls} built from the config "
        f"(closest renaming: {renaming or 'none'}): {len(missing)} of {len(target_keys)} model keys missing"
        f"{f' ({_first(missing)})' if missing else ''}, {len(unexpected)} unexpected checkpoint keys"
        f"{f' ({_first(unexpected)})' if unexpected else ''}. Check that the config's architecture and model "
        f"section describe the trained network, or save the bare network's weights: "
        f"torch.save(net.state_dict(), 'ckpt.pt')"
    )


def _check_shapes(path: Path, cls: str, state: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> None:
    bad = [
        f"{k}: checkpoint {tuple(v.shape)}, model {tuple(target[k].shape)}"
        for k, v in state.items()
        if tuple(v.shape) != tuple(target[k].shape)
    ]
    if bad:
        raise CheckpointError(
            f"{path}: {len(bad)} tensors have other shapes than in {cls} built from the config "
            f"({'; '.join(bad[:_SHOW])}{'; …' if len(bad) > _SHOW else ''}); does the config's model section match "
            f"the checkpoint?"
        )


def load_weights(model: torch.nn.Module, path: str | Path, weights: str = "model") -> CheckpointWeights:
    """Load a checkpoint's weights into ``model`` (strict), in place, and put it in eval mode.

    Args:
        model: the built network.
        path: the checkpoint file.
        weights: ``model`` or ``ema``.

    Returns:
        Which weights were loaded, from where (also logged at INFO).

    Raises:
        FileNotFoundError, CheckpointError: see :func:`read_checkpoint` and :func:`select_weights`.
    """
    picked = select_weights(read_checkpoint(path), model, path, weights)
    model.load_state_dict(picked.state_dict, strict=True)
    model.eval()
    logger.info("loaded %s", picked.describe())
    return picked


def load_checkpoint(
    path: str | Path, cfg: Mapping[str, Any], weights: str = "model"
) -> tuple[torch.nn.Module, CheckpointWeights]:
    """Rebuild the network a config describes and load a checkpoint's weights into it.

    Args:
        path: the checkpoint file.
        cfg: a config with ``architecture`` (default ours) and ``model``.
        weights: ``model`` or ``ema``.

    Returns:
        The network in eval mode, and which weights were loaded.
    """
    model = build_model(cfg)
    return model, load_weights(model, path, weights)
