"""The denoiser contract, checked on the model itself before anything is exported or written.

A package declares ``x`` ``[B, C_img + 1, *patch]``, ``t`` float32 ``[B]`` and ``y`` ``[B, output_channels, *patch]``
(DESIGN.md, "The denoiser contract"). :func:`check_denoiser` runs the model in eval mode on real inputs at
t = 0, T/2 and T−1 (batch 2) and refuses, naming the model class, the check and what it got:

- a TorchScript module (export the eager ``nn.Module``);
- a patch that is not fixed (three positive ints) or not divisible by the UNet's downsampling (2**levels);
- a model that needs integer ``t`` (``nn.Embedding`` on t), or other input channels than the package feeds;
- an output that is not one float32 tensor ``[B, output_channels, *patch]`` (a 2-channel model declared with 1,
  valid-padding outputs such as 30³ from 32³, no channel axis) or is not finite.

A model with a condition graph (:class:`~diffseg.export.onnx_export.Condition`) is checked in the order the runtime
runs it: :func:`check_condition` runs the condition graph on the image channels (a tuple of float32 tensors, one per
declared feature, each of batch B, finite), then :func:`check_denoiser` runs ``f(x, t, *features)``.

:func:`explain_export_error` turns the errors of ``torch.onnx.export`` (torch.export) that researchers meet into
diffseg's words: a branch on the value of ``t`` (data-dependent control flow), a batch size fixed inside the model.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

import numpy as np
import torch

from .onnx_export import Condition, ExportError

__all__ = [
    "ContractError",
    "check_condition",
    "check_denoiser",
    "check_patch",
    "explain_export_error",
    "refuse_scripted",
]

CHECK_TIMESTEPS = "t = 0, T/2, T-1"


class ContractError(ExportError):
    """The model does not meet the denoiser contract the package would declare; nothing was written."""


def _name(model: object) -> str:
    return type(model).__name__


def refuse_scripted(model: object) -> None:
    """Refuse TorchScript modules and anything that is not an ``nn.Module``.

    Raises:
        ContractError: a ``torch.jit.ScriptModule`` / ``ScriptFunction``.
        TypeError: not an ``nn.Module``.
    """
    if isinstance(model, torch.jit.ScriptModule | torch.jit.ScriptFunction):
        raise ContractError(
            f"{_name(model)} is a TorchScript module (torch.jit.script/trace); diffseg exports through torch.export: "
            f"export the eager nn.Module, not a ScriptModule"
        )
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module with forward(x, t), got {type(model).__name__}")


def check_patch(patch_size: Sequence[object]) -> tuple[int, ...]:
    """A fixed patch: three positive ints (the sliding window feeds every window at that size).

    Raises:
        ContractError: a dynamic or malformed patch.
    """
    patch = list(patch_size) if isinstance(patch_size, Sequence) and not isinstance(patch_size, str) else None
    if (
        patch is None
        or len(patch) != 3
        or any(isinstance(p, bool) or not isinstance(p, int | np.integer) or p < 1 for p in patch)
    ):
        raise ContractError(
            f"patch_size must be three positive ints (a package has one fixed patch: the sliding window feeds "
            f"every window at that size, and the batch is the only dynamic axis), got {patch_size!r}"
        )
    return tuple(int(p) for p in patch)


def _run_recording_sizes(
    model: torch.nn.Module, run: Callable[[], None]
) -> tuple[Exception | None, list[tuple[int, ...]]]:
    """Run ``run()`` with hooks that record the spatial size of every 5-D activation; returns the error it raised
    (or None) and the sizes seen (the deepest level tells the UNet's downsampling)."""
    sizes: list[tuple[int, ...]] = []

    def hook(_module, _inputs, output) -> None:
        if isinstance(output, torch.Tensor) and output.dim() == 5:
            sizes.append(tuple(output.shape[2:]))

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    error = None
    try:
        run()
    except Exception as exc:  # returned to the caller, which explains it
        error = exc
    finally:
        for h in handles:
            h.remove()
    return error, sizes


def _divisor(patch: tuple[int, ...], sizes: list[tuple[int, ...]]) -> int:
    """2**levels: the patch over the smallest activation size reached, rounded to a power of two."""
    if not sizes:
        return 1
    ratio = max(p / max(min(s[i] for s in sizes), 1) for i, p in enumerate(patch))
    return 2 ** max(round(math.log2(ratio)), 1)


def _explain_forward_error(
    cls: str,
    exc: Exception,
    patch: tuple[int, ...],
    in_channels: int,
    divisor: int,
    t_value: float,
    features: Sequence[str] = (),
) -> ContractError:
    message = str(exc)
    first = message.strip().splitlines()[0] if message.strip() else type(exc).__name__
    if "indices" in message and ("Long" in message or "Int" in message):
        return ContractError(
            f"{cls}: the contract check (forward at {CHECK_TIMESTEPS}) failed: the model needs integer t "
            f"(an nn.Embedding on t?) but diffseg feeds t as float32 [B]; cast t inside forward: t.long() "
            f"(torch said: {first})"
        )
    if isinstance(exc, TypeError) and re.search(r"forward\(\) (takes|missing)", message):
        args = ", ".join(["x", "t", *features])
        return ContractError(
            f"{cls}: the contract check (forward at {CHECK_TIMESTEPS}) failed: forward must take ({args}), x "
            f"[B, C_img + 1, *patch] and t float32 [B]"
            + (f", then the condition graph's features {list(features)}" if features else "")
            + f"; wrap the network in a module whose forward({args}) calls it (torch said: {first})"
        )
    channels = re.search(r"expected input\[[^\]]*\] to have (\d+) channels, but got (\d+) channels", message)
    if channels and channels.group(2) == str(in_channels):
        return ContractError(
            f"{cls}: the contract check (forward at {CHECK_TIMESTEPS}) failed: the model's first layer takes "
            f"{channels.group(1)} input channels, the package feeds {in_channels} (the image channels of the "
            f"modalities + 1 noisy channel); check the modalities and the model's in_channels"
        )
    mismatch = "Sizes of tensors must match" in message or ("size of tensor a" in message and "must match" in message)
    if mismatch and any(p % divisor for p in patch):
        suggest = tuple(int(math.ceil(p / divisor) * divisor) for p in patch)
        return ContractError(
            f"{cls}: the contract check (forward at {CHECK_TIMESTEPS}) failed on patch {patch}: a skip "
            f"connection joins tensors of different sizes; patch must be divisible by 2**levels = {divisor} "
            f"(e.g. {suggest}) (torch said: {first})"
        )
    return ContractError(
        f"{cls}: the contract check (forward on x [2, {in_channels}, {', '.join(map(str, patch))}], t = "
        f"{t_value:g} float32 [2]) raised {type(exc).__name__}: {first}"
    )


def check_condition(condition: Condition, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Run the condition graph on ``images`` [B, C_img, *patch] (eval mode, no gradients); its features.

    Raises:
        ContractError: it raised, or did not return a tuple of ``len(condition.features)`` finite float32 tensors
            of batch B; the message names the class, the feature and what it got.
    """
    module = condition.module
    refuse_scripted(module)
    cls, names, batch = _name(module), list(condition.features), images.shape[0]
    shape = ", ".join(map(str, images.shape))
    module.eval()
    try:
        with torch.no_grad():
            out = module(images)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ContractError(
            f"{cls}: the condition graph's contract check (forward on image [{shape}]) raised "
            f"{type(exc).__name__}: {first}"
        ) from exc
    check = f"{cls}: the condition graph's output check (image [{shape}])"
    if not isinstance(out, tuple | list) or not all(isinstance(f, torch.Tensor) for f in out):
        kinds = type(out).__name__ if not isinstance(out, tuple | list) else [type(f).__name__ for f in out]
        raise ContractError(
            f"{check}: returned {kinds}; return a tuple of tensors, one per feature {names}, each [B, ...]"
        )
    if len(out) != len(names):
        raise ContractError(f"{check}: returned {len(out)} tensors, the package declares the features {names}")
    for name, f in zip(names, out, strict=True):
        if f.dim() < 1 or f.shape[0] != batch:
            raise ContractError(
                f"{check}: feature {name!r} has shape {tuple(f.shape)}, not batch {batch} first ([B, ...]: one row "
                f"per window, the batch is the one dynamic axis)"
            )
        if f.dtype != torch.float32:
            raise ContractError(f"{check}: feature {name!r} has dtype {f.dtype}, the contract is float32")
        if not bool(torch.isfinite(f).all()):
            raise ContractError(f"{check}: feature {name!r} holds NaN or Inf")
    return tuple(out)


def check_denoiser(
    model: torch.nn.Module,
    *,
    in_channels: int,
    patch: Sequence[int],
    output_channels: int,
    prediction_channel: int = 0,
    num_train_timesteps: int = 1000,
    patches: Sequence[np.ndarray] = (),
    seed: int = 0,
    noisy_channels: int = 1,
    condition: Condition | None = None,
) -> None:
    """Run the denoiser contract check on ``model`` (eval mode, no gradients) before it is exported.

    Args:
        model: the denoiser ``f(x, t)``.
        in_channels: channels of ``x`` (image channels + the noisy channels).
        patch: the package's fixed patch.
        output_channels: the channels the package declares for ``y`` (2 for learned-σ models).
        prediction_channel: the channel holding the prediction.
        num_train_timesteps: T; the check runs at t = 0, T/2, T−1.
        patches: real image patches ``[C_img, *patch]``; the first one is used, else random normal images.
        seed: seed of the noisy channels (and of the random image when no patch is given).
        noisy_channels: one per target.
        condition: the model's condition graph: its features (:func:`check_condition` on the image channels of x)
            are passed after t.

    Raises:
        ContractError: a check failed; the message names the model class, the check and the value got.
        TypeError: ``model`` is not an ``nn.Module``.
    """
    refuse_scripted(model)
    patch = check_patch(patch)
    cls = _name(model)
    if not 0 <= prediction_channel < output_channels:
        raise ValueError(f"prediction_channel must be in [0, {output_channels}), got {prediction_channel}")
    rng = np.random.default_rng(seed)
    c_img = in_channels - noisy_channels
    if patches:
        image = np.asarray(patches[0], np.float32)
        if image.shape != (c_img, *patch):
            raise ValueError(f"patches must be [C_img, *patch] = {[c_img, *patch]}, got {list(image.shape)}")
        image = np.repeat(image[None], 2, axis=0)
    else:
        image = rng.standard_normal((2, c_img, *patch), dtype=np.float32)
    noisy = rng.standard_normal((2, noisy_channels, *patch), dtype=np.float32)
    x = torch.from_numpy(np.ascontiguousarray(np.concatenate([image, noisy], axis=1)))
    features = check_condition(condition, x[:, condition.image_channels]) if condition is not None else ()
    names = condition.features if condition is not None else ()
    model.eval()
    want = (2, output_channels, *patch)
    T = int(num_train_timesteps)
    for t_value in (0.0, float(T // 2), float(T - 1)):
        t = torch.full((2,), t_value, dtype=torch.float32)
        result: list[object] = []

        def run(t: torch.Tensor = t, result: list[object] = result) -> None:
            with torch.no_grad():
                result.append(model(x, t, *features))

        error, sizes = _run_recording_sizes(model, run)
        if error is not None:
            divisor = _divisor(patch, sizes)
            raise _explain_forward_error(cls, error, patch, in_channels, divisor, t_value, names) from error
        y = result[0]
        check = f"{cls}: the output check at t = {t_value:g} (x [2, {in_channels}, {', '.join(map(str, patch))}])"
        if not isinstance(y, torch.Tensor):
            raise ContractError(
                f"{check}: the model returned a {type(y).__name__}, not a tensor; return the prediction tensor "
                f"[B, {output_channels}, *patch] from forward"
            )
        got = tuple(y.shape)
        if y.dim() != 2 + len(patch):
            hint = " (no channel axis: return y.unsqueeze(1))" if got == (2, *patch) else ""
            raise ContractError(f"{check}: output shape {got}, the package declares {want}{hint}")
        if got[2:] != patch:
            raise ContractError(
                f"{check}: output shape {got}, the package declares {want}: the spatial size differs from the "
                f"patch (valid padding?); the output must keep the patch size (padding='same' or padding=k//2)"
            )
        if got[0] != 2:
            raise ContractError(f"{check}: output shape {got} for a batch of 2, the package declares {want}")
        if got[1] != output_channels:
            raise ContractError(
                f"{check}: output shape {got}: {got[1]} output channels where the package declares "
                f"{output_channels} (diffusion.output_channels; a learned-sigma model declares output_channels 2 "
                f"with prediction_channel 0)"
            )
        if y.dtype != torch.float32:
            raise ContractError(f"{check}: output dtype {y.dtype}, the contract is float32 (return y.float())")
        if not bool(torch.isfinite(y).all()):
            raise ContractError(f"{check}: the output holds NaN or Inf")


def explain_export_error(model: torch.nn.Module, exc: Exception) -> ExportError | None:
    """diffseg's words for a ``torch.onnx.export`` failure researchers meet, or None when it is not one of them."""
    chain, seen = [], exc
    while seen is not None and len(chain) < 8:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    text = "\n".join(f"{type(e).__name__}: {e}" for e in chain)
    cls = _name(model)
    where = re.search(r'The following call raised this error:\s+File "([^"]+)", line (\d+), in (\w+)\s+(.+)', text)
    at = f" at {where.group(1)}:{where.group(2)} ({where.group(4).strip()})" if where else ""
    if (
        "DataDependent" in text
        or "data-dependent" in text
        or "Dynamic control flow" in text
        or "data dependent" in text
    ):
        return ExportError(
            f"{cls}: torch.export failed on data-dependent control flow{at}: a branch on the value of t (or of x) "
            f"cannot be exported; compute both branches and pick with torch.where, or branch on shapes only"
        )
    if re.search(r"inferred a static shape of \d+ for dimension inputs\['[xt]'\]\.shape\[0\]", text) or (
        "Constraints violated" in text and "batch" in text
    ):
        return ExportError(
            f"{cls}: torch.export found the batch size fixed inside the model{at}; the batch is the package's one "
            f"dynamic axis: use x.shape[0] (or -1) instead of a constant batch size"
        )
    return None
