"""torch.export programs (``denoiser.pt2``): written beside the ONNX files, run by the torch backend with no registry.

:func:`export_program` traces a denoiser ``f(x, t)`` with ``torch.export.export`` (batch dynamic, patch fixed),
saves it with ``torch.export.save`` and checks that the saved file loads back and equals the eager model.
:func:`load_program` reads a program for the torch backend and for ``diffseg export --program``.

A model with a condition graph has two programs: the denoiser ``f(x, t, *features)`` (:func:`export_program` with
its ``condition``) and the condition graph ``condition(image) → features`` (``condition.pt2``,
:func:`export_condition_program`); :func:`load_program` reads either (``features``, ``role``) with the same checks.

What ``torch.export.load`` runs (read in torch 2.13, ``torch/export/__init__.py``,
``torch/export/pt2_archive/_package.py``, ``torch/_export/serde/serialize.py``, ``torch/export/_unlift.py``): it
is **not** a ``weights_only`` load, and torch's own docstring says "never load data from an untrusted source".

- Pickle: a weight or constant whose payload is marked ``use_pickle`` (tensor subclasses) is read with
  ``torch.load(..., weights_only=False)``; an "opaque object" constant with ``pickle.loads``; a TorchScript custom
  object with ``torch._C._pickle_load_obj``; the sample inputs (and the legacy state dict and constants) with
  ``torch.load(weights_only=True)`` that **falls back to** ``weights_only=False`` when the restricted load fails;
  an archive that the reader rejects is retried in the pre-2.8 zip layout, read the same way.
- Native code: an archive holding ``data/aotinductor/`` gets its AOTInductor shared library loaded.
- ``eval``/``exec`` without pickle: every symbolic shape in the program's JSON (``expr_str``) goes through
  ``sympy.sympify``, which evaluates the string; ``ExportedProgram.module()`` (``check_guards=True``, the default)
  ``exec``s the program's ``guards_code`` strings; and a node's target is resolved by ``getattr`` from ``torch``,
  ``math`` or ``operator``, so that any callable reachable there (``torch.os.system``) can become a graph call.

diffseg's rule is that loading a file never runs code from it (checkpoints load with ``weights_only=True``), so
:func:`load_program` reads the file once into memory and, before ``torch.export.load`` sees those bytes, refuses
an archive that holds anything outside the records ``torch.export.save`` writes for a plain program (raw tensor
weights and constants, the JSON program, sample inputs, extra text files), any pickled payload or custom/opaque
object, AOTInductor/ExecuTorch code, sample inputs that ``weights_only=True`` cannot read, and any ``expr_str``
that is not a plain sympy ``srepr`` (allowed names, numbers, quoted symbol names, ``( ) , = -``). After loading it
refuses graph calls other than ATen/prims operators, arithmetic on sizes and a few control-flow operators, and it
builds the module with ``check_guards=False`` (no ``exec`` of the stored guards; the module's pre-hook still checks
input shapes against the program's ranges). The package's sha256 check comes first in any case.
"""

from __future__ import annotations

import io
import json
import logging
import math
import operator
import tokenize
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from diffseg.runtime.atomic import atomic_path
from diffseg.runtime.verify import compare_outputs

if TYPE_CHECKING:
    from .onnx_export import Condition

__all__ = [
    "PROGRAM_LIMIT",
    "ExportedDenoiser",
    "ExportedGraph",
    "ProgramError",
    "export_condition_program",
    "export_program",
    "load_program",
]

logger = logging.getLogger("diffseg.export")

#: ‖program − eager‖/‖eager‖ allowed when the saved program is checked against the model it came from.
PROGRAM_LIMIT = 1e-5
SAVE_HINT = (
    "save the eager model's program with torch.export.save(torch.export.export(model.eval(), (x, t), "
    "dynamic_shapes=({0: batch}, {0: batch})), 'denoiser.pt2') with batch = torch.export.Dim('batch', min=1)"
)
# Graph calls a loaded program may hold besides ATen/prims operators: torch's own verifier's arithmetic on sizes,
# and the higher-order operators of control flow (their subgraphs are checked like the main graph).
_OP_NAMESPACES = ("aten", "prims")
_BUILTIN_CALLS = frozenset(
    {
        *(getattr(operator, n) for n in ("getitem", "add", "mul", "sub", "truediv", "floordiv", "mod", "pow")),
        *(getattr(operator, n) for n in ("ge", "le", "gt", "lt", "eq", "ne", "and_", "or_", "not_", "neg", "abs")),
        operator.lshift,
        operator.rshift,
        math.ceil,
        math.floor,
        math.trunc,
        round,
        *(getattr(torch, n) for n in ("sym_int", "sym_float", "sym_ite", "sym_max", "sym_min", "sym_not", "sym_sqrt")),
    }
)
_CONTROL_FLOW = frozenset({"cond", "while_loop", "wrap_with_set_grad_enabled", "wrap_with_autocast"})
# What ``sympy.srepr`` writes for the sizes of a program: sympy's classes, torch's sympy functions, assumptions.
_SYMPY_NAMES = frozenset(
    {
        "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Mod", "Max", "Min", "Abs", "floor",
        "ceiling", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "StrictLessThan", "StrictGreaterThan", "LessThan",
        "GreaterThan", "Equality", "Unequality", "And", "Or", "Not", "BooleanTrue", "BooleanFalse", "true",
        "false", "True", "False", "Infinity", "NegativeInfinity", "oo", "zoo", "nan", "NaN", "One", "Zero",
        "NegativeOne", "Half", "IntInfinity", "NegativeIntInfinity", "int_oo", "precision",
        "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv",
        "IntTrueDiv", "FloatTrueDiv", "LShift", "RShift", "IsNonOverlappingAndDenseIndicator", "TruncToFloat",
        "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat", "FloatPow", "PowByNatural", "Identity",
        "positive", "negative", "nonnegative", "nonpositive", "nonzero", "zero", "integer", "real", "finite",
        "infinite", "rational", "even", "odd", "extended_real", "commutative",
    }
)  # fmt: skip
_SYMPY_OPS = frozenset({"(", ")", ",", "=", "-"})
ROLES = ("denoiser", "condition")


class ProgramError(ValueError):
    """A file that :func:`load_program` will not load; the message names the file, the problem and what to do."""


class ExportedDenoiser(torch.nn.Module):
    """A loaded ``torch.export`` program behind the denoiser contract ``f(x, t)``.

    The module of ``ExportedProgram.module()`` refuses ``train()`` and ``eval()``; its mode was fixed when it was
    exported, so this wrapper takes ``eval()`` (what every diffseg caller asks) and refuses ``train()``.

    Attributes:
        program: the program's module.
        source: the file it was read from.
    """

    def __init__(self, program: torch.nn.Module, source: Path) -> None:
        super().__init__()
        self.program = program
        self.source = source

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.program(x, t)

    def train(self, mode: bool = True) -> ExportedDenoiser:
        if mode:
            raise RuntimeError(f"{self.source.name}: a torch.export program cannot be trained (it runs as exported)")
        self.training = False
        return self


class ExportedGraph(ExportedDenoiser):
    """A loaded program of a model with a condition graph: the denoiser ``f(x, t, *features)`` or the condition
    graph ``condition(image) → features`` (a plain denoiser keeps ``forward(x, t)``: ``torch.export`` and
    ``torch.onnx.export`` of it, as ``diffseg export --program`` runs, read the signature)."""

    def forward(self, *inputs: torch.Tensor) -> Any:  # type: ignore[override]
        return self.program(*inputs)


def export_program(
    model: torch.nn.Module,
    in_channels: int,
    patch: Sequence[int],
    path: str | Path,
    *,
    num_train_timesteps: int = 1000,
    seed: int = 0,
    condition: Condition | None = None,
) -> Path:
    """Trace ``model`` with ``torch.export`` (``x`` [B, C, *patch], ``t`` float32 [B], B dynamic) and save it.

    Traced at batch 2 (torch specialises a dimension seen as 1); the file is written atomically and published only
    once :func:`load_program` reads it back and it equals the eager model on a random batch of 3 at t = 0, T/2,
    T−1 to :data:`PROGRAM_LIMIT` (‖Δ‖/‖ref‖).

    Args:
        model: the denoiser (an eager ``nn.Module``).
        in_channels: channels of ``x``.
        patch: the fixed patch.
        path: the ``.pt2`` file to write.
        num_train_timesteps: T, for the timesteps of the check.
        seed: seed of the trace and check inputs.
        condition: a conditioned model's condition graph: the program takes its features after ``t`` (computed
            by it from the image channels of the trace and check inputs), each with the same dynamic batch.

    Returns:
        ``path``.

    Raises:
        ExportError: torch.export failed, or the saved program does not load back or differs from the model; the
            message names the model class. Nothing is left at ``path``.
    """
    from .contract_checks import refuse_scripted  # here: load_program needs torch alone

    refuse_scripted(model)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, in_channels, *patch, generator=gen)
    t = torch.tensor([10.0, num_train_timesteps / 2])
    T = int(num_train_timesteps)
    x_check = torch.randn(3, in_channels, *patch, generator=gen)
    t_check = torch.tensor([0.0, float(T // 2), float(T - 1)])
    features = len(condition.features) if condition is not None else 0

    def with_features(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if condition is None:
            return (x, t)
        with torch.no_grad():
            return (x, t, *(f.detach() for f in condition(x)))

    return _export_checked(
        model,
        with_features(x, t),
        with_features(x_check, t_check),
        Path(path),
        lambda p: load_program(p, in_channels=in_channels, patch=patch, features=features),
        f"at t = 0, {T // 2}, {T - 1}",
    )


def export_condition_program(
    condition: Condition, image_channels: int, patch: Sequence[int], path: str | Path, *, seed: int = 0
) -> Path:
    """Trace a condition graph (``image`` [B, C_img, *patch] → its features, B dynamic) and save it, checked as
    :func:`export_program` checks a denoiser (loaded back, equal to the eager module on a random batch of 3).

    Raises:
        ExportError: as :func:`export_program`.
    """
    from .contract_checks import refuse_scripted

    refuse_scripted(condition.module)
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(2, image_channels, *patch, generator=gen)
    check = torch.randn(3, image_channels, *patch, generator=gen)
    n = len(condition.features)
    return _export_checked(
        condition.module,
        (image,),
        (check,),
        Path(path),
        lambda p: load_program(p, in_channels=image_channels, patch=patch, features=n, role="condition"),
        "on a random batch of 3",
    )


def _numpy_outputs(out: Any) -> list[Any]:
    return [f.numpy() for f in out] if isinstance(out, tuple | list) else [out.numpy()]


def _export_checked(
    model: torch.nn.Module,
    trace_args: tuple[torch.Tensor, ...],
    check_args: tuple[torch.Tensor, ...],
    path: Path,
    load: Any,
    when: str,
) -> Path:
    """``torch.export`` of ``model`` on ``trace_args`` (dim 0 of each the one dynamic ``batch``), saved to ``path``
    atomically once ``load(saved)`` reads it back and it equals the eager model on ``check_args``."""
    from .contract_checks import explain_export_error
    from .onnx_export import ExportError

    cls = type(model).__name__
    model = model.eval()
    batch = torch.export.Dim("batch", min=1)
    try:
        program = torch.export.export(model, trace_args, dynamic_shapes=tuple({0: batch} for _ in trace_args))
    except Exception as exc:  # every torch.export failure becomes an ExportError naming the model
        explained = explain_export_error(model, exc)
        if explained is not None:
            raise explained from exc
        raise ExportError(
            f"{cls}: torch.export.export failed for the torch backend's program ({path.name}): "
            f"{type(exc).__name__}: {_first_line(exc)} — package not written"
        ) from exc
    with atomic_path(path) as tmp:
        torch.export.save(program, tmp)
        try:
            loaded = load(tmp)
        except ProgramError as exc:
            raise ExportError(f"{cls}: the saved torch.export program cannot be loaded back: {exc}") from exc
        with torch.no_grad():
            pairs = list(zip(_numpy_outputs(loaded(*check_args)), _numpy_outputs(model(*check_args)), strict=True))
        result = compare_outputs("torch_export_vs_torch_fp32", pairs, PROGRAM_LIMIT)
        if not result.passed:
            raise ExportError(
                f"{cls}: the saved torch.export program differs from the eager model {when}: "
                f"relative error {result.rel_error:.3e} over limit {PROGRAM_LIMIT:.0e}"
                + ("" if result.finite else " and non-finite values (NaN/Inf)")
                + " — package not written"
            )
        logger.info(
            "torch.export program %s vs eager: rel %.2e (limit %.0e)", path.name, result.rel_error, PROGRAM_LIMIT
        )
    return path


def load_program(
    path: str | Path,
    *,
    in_channels: int | None = None,
    patch: Sequence[int] | None = None,
    features: int = 0,
    role: str = "denoiser",
) -> ExportedDenoiser:
    """Load a ``torch.export`` program (``torch.export.save``) without running code from the file.

    See the module docstring for what is refused before and after ``torch.export.load``.

    Args:
        path: the ``.pt2`` file.
        in_channels: when given, the channels ``x`` (``image`` for a condition graph) must have in the program.
        patch: when given, the patch ``x`` (``image``) must have in the program.
        features: the condition graph's features: the denoiser's inputs after ``t``, or the condition graph's
            outputs (0 with ``role="condition"``: any number).
        role: ``denoiser`` (``f(x, t, *features)``, one output) or ``condition`` (``image`` → the features).

    Returns:
        The program as a module ``f(x, t)`` (``f(x, t, *features)``; ``condition(image)``) in eval mode, on the CPU.

    Raises:
        FileNotFoundError: no such file.
        ProgramError: not a torch.export program (damaged, a TorchScript archive, a ``torch.save`` file), a program
            holding what diffseg refuses to load, or one that does not meet the denoiser contract.
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {list(ROLES)}, got {role!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such torch.export program")
    data = path.read_bytes()  # read once: what is checked is what torch.export.load reads
    _check_archive(data, path)
    try:
        program = torch.export.load(io.BytesIO(data))
    except Exception as exc:  # any failure of torch's reader is a file that is not a usable program
        raise ProgramError(
            f"{path} is not a torch.export program that torch {torch.__version__} can load "
            f"({type(exc).__name__}: {_first_line(exc)}); {SAVE_HINT}"
        ) from None
    _check_graph(program, path)
    if role == "condition":
        _check_condition_signature(program, path, in_channels, patch, features)
    else:
        _check_signature(program, path, in_channels, patch, features)
    module = program.module(check_guards=False)  # no exec of the stored guards_code
    wrapper = ExportedGraph if (features or role == "condition") else ExportedDenoiser
    return wrapper(module, path).eval()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _check_archive(data: bytes, path: Path) -> None:
    """Refuse what is not a plain program before ``torch.export.load`` sees it (see the module docstring)."""
    from torch.export.pt2_archive import constants as c

    try:
        # The reader that torch.export.load uses (PT2ArchiveReader wraps it): the records checked are those torch reads.
        archive = torch._C.PyTorchFileReader(io.BytesIO(data))
        names = list(archive.get_all_records())
    except Exception as exc:  # the reader's own errors: truncated, not a zip, not a PyTorch archive
        raise ProgramError(
            f"{path} is not a torch.export program (torch's archive reader: {type(exc).__name__}: "
            f"{_first_line(exc)}; truncated or not a .pt2 file?); {SAVE_HINT}"
        ) from None
    records = set(names)

    def read(name: str) -> bytes:
        if name not in records:
            raise ProgramError(f"{path}: no {name!r} record; not a complete torch.export program; {SAVE_HINT}")
        try:
            return archive.get_record(name)
        except Exception as exc:  # a damaged record
            raise ProgramError(
                f"{path}: record {name!r} cannot be read ({type(exc).__name__}: {_first_line(exc)}); {SAVE_HINT}"
            ) from None

    if c.ARCHIVE_FORMAT_PATH not in records or read(c.ARCHIVE_FORMAT_PATH) != c.ARCHIVE_FORMAT_VALUE.encode():
        raise ProgramError(_not_a_program(path, names))
    version = read(c.ARCHIVE_VERSION_PATH).decode(errors="replace")
    if version != c.ARCHIVE_VERSION_VALUE:
        raise ProgramError(
            f"{path}: archive version {version!r}, torch {torch.__version__} reads {c.ARCHIVE_VERSION_VALUE!r}; "
            f"save the program again with this torch ({SAVE_HINT})"
        )
    models = [n[len(c.MODELS_DIR) : -len(".json")] for n in names if n.startswith(c.MODELS_DIR)]
    if models != ["model"]:
        raise ProgramError(
            f"{path}: holds the programs {models}; diffseg reads one program saved by torch.export.save (named "
            f"'model'): {SAVE_HINT}"
        )
    fixed = {
        c.ARCHIVE_FORMAT_PATH,
        c.ARCHIVE_VERSION_PATH,
        "byteorder",
        c.MODELS_FILENAME_FORMAT.format("model"),
        c.SAMPLE_INPUTS_FILENAME_FORMAT.format("model"),
        c.WEIGHTS_CONFIG_FILENAME_FORMAT.format("model"),
        c.CONSTANTS_CONFIG_FILENAME_FORMAT.format("model"),
    }
    payloads = (c.WEIGHTS_DIR + c.WEIGHT_FILENAME_PREFIX, c.CONSTANTS_DIR + c.TENSOR_CONSTANT_FILENAME_PREFIX)
    for name in names:
        if name not in fixed and not name.startswith((".data/", c.EXTRA_DIR, *payloads)):
            raise ProgramError(
                f"{path}: holds {name!r}, which a plain torch.export program does not (AOTInductor or ExecuTorch "
                f"code, pickled or legacy data); diffseg never loads code from a model file: {SAVE_HINT}"
            )
    for config, prefix in (
        (c.WEIGHTS_CONFIG_FILENAME_FORMAT, c.WEIGHT_FILENAME_PREFIX),
        (c.CONSTANTS_CONFIG_FILENAME_FORMAT, c.TENSOR_CONSTANT_FILENAME_PREFIX),
    ):
        for fqn, meta in _json(read(config.format("model")), path).get("config", {}).items():
            stored = str(meta.get("path_name", ""))
            if meta.get("use_pickle", True) or not stored.startswith(prefix):
                raise ProgramError(
                    f"{path}: {fqn!r} is stored as a pickled object ({stored}), which diffseg does not unpickle; "
                    f"export a model whose weights and constants are plain tensors (no tensor subclasses, script "
                    f"objects or opaque objects)"
                )
    sample = c.SAMPLE_INPUTS_FILENAME_FORMAT.format("model")
    try:  # torch retries a failed restricted load with weights_only=False: here it must not fail
        torch.load(io.BytesIO(read(sample)), map_location="cpu", weights_only=True)
    except ProgramError:
        raise
    except Exception as exc:
        raise ProgramError(
            f"{path}: its sample inputs hold objects that weights_only=True refuses ({type(exc).__name__}); "
            f"diffseg never unpickles them: {SAVE_HINT}"
        ) from None
    for expr in _expr_strings(_json(read(c.MODELS_FILENAME_FORMAT.format("model")), path)):
        _check_sympy_repr(expr, path)


def _json(data: bytes, path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise ProgramError(f"{path}: a JSON record of the program is damaged ({exc}); {SAVE_HINT}") from None
    if not isinstance(doc, dict):
        raise ProgramError(f"{path}: a JSON record of the program is not an object; {SAVE_HINT}")
    return doc


def _not_a_program(path: Path, names: Sequence[str]) -> str:
    if "constants.pkl" in names or any(n.startswith("code/") for n in names):
        return (
            f"{path} is a TorchScript archive (torch.jit.save), not a torch.export program; diffseg exports through "
            f"torch.export: export the eager nn.Module, not a ScriptModule: {SAVE_HINT}"
        )
    if "data.pkl" in names:
        return (
            f"{path} is a torch.save file (a state_dict or a pickled module), not a torch.export program; pass a "
            f"state_dict as --checkpoint with its config, or {SAVE_HINT}"
        )
    return f"{path} is not a torch.export program (no archive_format 'pt2' record); {SAVE_HINT}"


def _expr_strings(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "expr_str" and isinstance(value, str):
                yield value
            else:
                yield from _expr_strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _expr_strings(value)


def _check_sympy_repr(expr: str, path: Path) -> None:
    """``expr`` must be a plain ``sympy.srepr`` (torch ``sympify``s it, which evaluates the string)."""
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(expr).readline))
    except (tokenize.TokenError, SyntaxError):
        tokens = None
    bad = None if tokens is not None else expr
    for tok in tokens or ():
        if tok.type in (tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER):
            continue
        if tok.type == tokenize.NAME and tok.string in _SYMPY_NAMES:
            continue
        if tok.type == tokenize.NUMBER and tok.string.replace(".", "").replace("e", "").isdigit():
            continue
        if tok.type == tokenize.OP and tok.string in _SYMPY_OPS:
            continue
        if tok.type == tokenize.STRING and tok.string[:1] == tok.string[-1:] == "'":
            inner = tok.string[1:-1]
            if inner and all(ch.isalnum() or ch in "_.+-" for ch in inner):
                continue
        bad = tok.string
        break
    if bad is not None:
        raise ProgramError(
            f"{path}: a symbolic shape of the program is not a plain sympy expression ({expr[:80]!r}: {bad!r}); "
            f"torch would evaluate it, diffseg does not: {SAVE_HINT}"
        )


def _check_graph(program: Any, path: Path) -> None:
    """Every call in the program (and its subgraphs) is an ATen/prims operator, size arithmetic or control flow."""
    for gm in program.graph_module.modules():
        if not isinstance(gm, torch.fx.GraphModule):
            continue
        for node in gm.graph.nodes:
            if node.op in ("placeholder", "output", "get_attr"):
                continue
            target = node.target
            if node.op == "call_function":
                if isinstance(target, torch._ops.OpOverload) and target.namespace in _OP_NAMESPACES:
                    continue
                if isinstance(target, torch._ops.HigherOrderOperator) and target.name() in _CONTROL_FLOW:
                    continue
                if any(target is allowed for allowed in _BUILTIN_CALLS):
                    continue
            raise ProgramError(
                f"{path}: the program calls {node.op} {target!r}, which diffseg does not run (allowed: "
                f"{'/'.join(_OP_NAMESPACES)} operators, size arithmetic, {sorted(_CONTROL_FLOW)}); export a model "
                f"built from torch operators only"
            )


def _user_inputs(program: Any) -> list[Any]:
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    names = program.graph_signature.user_inputs
    return [placeholders[name].meta.get("val") if name in placeholders else None for name in names]


def _user_outputs(program: Any) -> list[Any]:
    from torch.export.graph_signature import OutputKind

    node = next(n for n in program.graph.nodes if n.op == "output")
    specs = program.graph_signature.output_specs
    return [
        getattr(arg, "meta", {}).get("val")
        for arg, spec in zip(node.args[0], specs, strict=False)
        if spec.kind == OutputKind.USER_OUTPUT
    ]


def _check_patch_axes(
    path: Path, what: str, shape: tuple, channels: int | None, patch: Sequence[int] | None, contract: str
) -> None:
    """``shape`` [B, C, *patch]: static but for B, and the package's C and patch when given."""
    if not all(isinstance(d, int) for d in shape[1:]):
        raise ProgramError(f"{path}: {what} has dynamic axes besides the batch ({list(shape)}); {contract}")
    want = [channels if channels is not None else shape[1], *(patch if patch is not None else shape[2:])]
    if list(shape[1:]) != [int(v) for v in want]:
        raise ProgramError(
            f"{path}: the program takes {what} [B, {', '.join(map(str, shape[1:]))}], the package declares "
            f"[B, {', '.join(map(str, want))}]"
        )


def _check_feature(path: Path, what: str, value: Any, batch: Any, contract: str) -> None:
    """A feature: a float32 tensor [B, ...] whose B is the program's batch and whose other axes are fixed."""
    shape = tuple(value.shape) if isinstance(value, torch.Tensor) else ()
    if (
        not shape
        or value.dtype != torch.float32
        or isinstance(shape[0], int)
        or (batch is not None and str(shape[0]) != str(batch))
        or not all(isinstance(d, int) for d in shape[1:])
    ):
        got = f"{value.dtype} {list(shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
        raise ProgramError(f"{path}: {what} is {got}; {contract}")


def _check_signature(
    program: Any, path: Path, in_channels: int | None, patch: Sequence[int] | None, features: int = 0
) -> None:
    """Two float32 tensor inputs ``x`` [B, C, *patch] and ``t`` [B] sharing a dynamic B (then ``features`` float32
    [B, ...] of the same B), one output."""
    sig = program.graph_signature
    vals = _user_inputs(program)
    if features:
        contract = (
            f"the denoiser contract is f(x, t, *features): x [B, C, *patch], t float32 [B], then the condition "
            f"graph's {features} features, each float32 [B, ...], one output y; only B is dynamic"
        )
    else:
        contract = "the denoiser contract is f(x, t): x [B, C, *patch], t float32 [B], one output y; only B is dynamic"
    if (
        len(vals) != 2 + features
        or not all(isinstance(v, torch.Tensor) for v in vals[:2])
        or len(sig.user_outputs) != 1
    ):
        raise ProgramError(
            f"{path}: the program takes {len(vals)} inputs and returns {len(sig.user_outputs)} outputs; {contract}"
        )
    x_shape, t_shape = (tuple(v.shape) for v in vals[:2])
    if len(t_shape) != 1 or len(x_shape) < 3 or any(v.dtype != torch.float32 for v in vals[:2]):
        raise ProgramError(
            f"{path}: the program's inputs are {[str(v.dtype) for v in vals[:2]]} of shapes {list(x_shape)} and "
            f"{list(t_shape)}; {contract}"
        )
    if isinstance(x_shape[0], int) or isinstance(t_shape[0], int):
        raise ProgramError(
            f"{path}: the program's batch is fixed at {x_shape[0]} (exported without dynamic_shapes?); the batch is "
            f"the package's one dynamic axis: {SAVE_HINT}"
        )
    _check_patch_axes(path, "x", x_shape, in_channels, patch, contract)
    for i, value in enumerate(vals[2:]):
        _check_feature(path, f"feature input {i} ({sig.user_inputs[2 + i]})", value, x_shape[0], contract)


def _check_condition_signature(
    program: Any, path: Path, image_channels: int | None, patch: Sequence[int] | None, features: int
) -> None:
    """One float32 input ``image`` [B, C_img, *patch] with a dynamic B; ``features`` outputs (any number ≥ 1 when
    0), each float32 [B, ...]."""
    vals, outs = _user_inputs(program), _user_outputs(program)
    n = features or "one or more"
    contract = (
        f"the condition graph contract is condition(image) -> features: image float32 [B, C_img, *patch], {n} "
        f"outputs, each float32 [B, ...]; only B is dynamic"
    )
    if len(vals) != 1 or not isinstance(vals[0], torch.Tensor) or not outs or (features and len(outs) != features):
        raise ProgramError(f"{path}: the program takes {len(vals)} inputs and returns {len(outs)} outputs; {contract}")
    shape = tuple(vals[0].shape)
    if vals[0].dtype != torch.float32 or len(shape) < 3:
        raise ProgramError(f"{path}: the program's input is {vals[0].dtype} of shape {list(shape)}; {contract}")
    if isinstance(shape[0], int):
        raise ProgramError(
            f"{path}: the program's batch is fixed at {shape[0]} (exported without dynamic_shapes?); the batch is "
            f"the package's one dynamic axis"
        )
    _check_patch_axes(path, "image", shape, image_channels, patch, contract)
    for i, value in enumerate(outs):
        _check_feature(path, f"output {i}", value, None, contract)
