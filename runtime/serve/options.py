"""Configuration of the DICOM node: one frozen dataclass, read from a TOML or JSON file.

A configuration file looks like this (TOML; the JSON form has the same keys)::

    ae_title = "DIFFSEG"
    port = 11112
    bind = "0.0.0.0"                   # default 127.0.0.1
    allowed_calling_aets = ["ORTHANC"]
    spool_dir = "/var/spool/diffseg"
    idle_seconds = 30
    model = "default"
    backend = "auto"

    [destination]
    ae_title = "ORTHANC"
    host = "10.0.0.5"
    port = 4242

Relative ``spool_dir`` paths are resolved against the folder of the configuration file.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

__all__ = ["Destination", "ServeOptions", "check_ae_title", "load_config"]

_DESTINATION_KEYS = ("ae_title", "host", "port", "outputs")

# PS3.5 6.2: AE titles are at most 16 characters of the default repertoire, no backslash or control
# characters; leading and trailing spaces are not significant, so a title of spaces only is empty.
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")


def check_ae_title(name: str, value: object) -> str:
    """Return ``value`` stripped if it is a valid AE title, else raise ``ValueError`` naming ``name``.

    Args:
        name: what the value is (used in the message), e.g. ``"ae_title"``.
        value: the candidate AE title.

    Returns:
        The title without leading or trailing spaces.

    Raises:
        ValueError: not a string of 1–16 printable ASCII characters without a backslash.
    """
    if not isinstance(value, str) or not _AE_TITLE.match(value) or not value.strip():
        raise ValueError(f"{name} must be 1-16 printable ASCII characters without '\\', got {value!r}")
    return value.strip()


def _check_port(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValueError(f"{name} must be an integer port in 1..65535, got {value!r}")
    return value


def _check_positive(name: str, value: object, allow_zero: bool = False) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ValueError(f"{name} must be a number {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return float(value)


def _check_outputs(value: object, name: str = "dicom_outputs") -> tuple[str, ...]:
    from ..outputs import DICOM_OUTPUTS

    if isinstance(value, str) or not isinstance(value, list | tuple) or not value:
        raise ValueError(f"{name} must be a non-empty list of {list(DICOM_OUTPUTS)}, got {value!r}")
    bad = [v for v in value if v not in DICOM_OUTPUTS]
    if bad or len(set(value)) != len(value):
        raise ValueError(f"{name} must hold distinct names of {list(DICOM_OUTPUTS)}, got {list(value)!r}")
    return tuple(value)


def _check_file_mode(value: object) -> int | None:
    """``file_mode`` as an int: TOML's ``0o640``, or a string of octal digits (JSON has no octal numbers)."""
    if value is None:
        return None
    if isinstance(value, str) and re.fullmatch(r"0?o?[0-7]{3,4}", value):
        value = int(value.replace("o", ""), 8)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0o777 or not value & 0o600 == 0o600:
        raise ValueError(
            f"file_mode must be permission bits that let the node read and write its files (0o600 to 0o777, "
            f'as 0o640 in TOML or "0640" in JSON), got {value!r}'
        )
    return value


@dataclass(frozen=True)
class Destination:
    """Where the node sends its outputs (a PACS's or a planning system's Storage SCP).

    Attributes:
        ae_title: the called AE title of the destination.
        host: its host name or IP address.
        port: its DICOM port.
        outputs: the output kinds it gets (``seg``, ``rtstruct``...); empty: every one the node writes.
    """

    ae_title: str
    host: str
    port: int
    outputs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "ae_title", check_ae_title("destination.ae_title", self.ae_title))
        if not isinstance(self.host, str) or not self.host.strip():
            raise ValueError(f"destination.host must be a non-empty host name or address, got {self.host!r}")
        _check_port("destination.port", self.port)
        if self.outputs:
            object.__setattr__(self, "outputs", _check_outputs(self.outputs, "destination.outputs"))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class ServeOptions:
    """Everything the node needs; see the module docstring for the file format (MB is 2^20 bytes in every ``*_mb``).

    Attributes:
        ae_title: the node's own AE title (also the calling AE title of its C-STOREs).
        port: the DICOM port the node listens on.
        allowed_calling_aets: calling AE titles whose associations are accepted; all others are rejected.
        destination: where the outputs go: one destination, or several (``[[destination]]`` tables in TOML, a
            list in JSON), each with the ``outputs`` it gets.
        spool_dir: received instances, results, the job queue and the log.
        bind: address to listen on (``0.0.0.0`` for every interface).
        idle_seconds: a study is complete when no instance of it arrived for this long.
        model: model package name or path, passed to ``Segmenter``.
        backend: backend name, passed to ``Segmenter``.
        max_send_attempts: C-STORE tries of one SEG before its job fails.
        retry_base_seconds: back-off after the first failed send; doubles with each further failure.
        retry_max_seconds: cap of the back-off.
        max_runs: times a job may start segmenting (a crash mid-run counts) before it fails.
        network_timeout: seconds for association, DIMSE and socket timeouts of the node's own C-STOREs.
        maximum_associations: concurrent incoming associations.
        max_wait_seconds: a study that lacks an input the model requires (the PET of a PET/CT model) waits this
            long after its last instance, then fails ("PET never arrived").
        dicom_outputs: what the node writes and sends for each study (``seg``, ``rtstruct``, ``labelmap``,
            ``fractional``).
        keep_done_days: a study's received instances and results stay in the spool this long after it was sent
            (a late series within that time is segmented again); 0 purges them at once.
        keep_failed_days: the same for a study whose job failed (kept for a look or a requeue).
        max_instance_mb: a larger instance is refused (``0xA700``).
        max_study_mb: an instance that would take its study beyond this is refused (``0xA700``).
        min_free_disk_mb: below this much free space on the spool's disk every C-STORE is refused (``0xA700``)
            instead of filling the disk.
        log_max_mb: ``serve.log`` is rotated at this size.
        log_backups: rotated logs kept (``serve.log.1`` ...).
        file_mode: permission bits of every file the node writes (``0o640``; in JSON the string ``"0640"``);
            None: 0o666 less the umask.
    """

    ae_title: str
    port: int
    allowed_calling_aets: tuple[str, ...]
    destination: Destination | tuple[Destination, ...]
    spool_dir: Path
    bind: str = "127.0.0.1"
    idle_seconds: float = 30.0
    model: str = "default"
    backend: str = "auto"
    max_send_attempts: int = 8
    retry_base_seconds: float = 2.0
    retry_max_seconds: float = 300.0
    max_runs: int = 3
    network_timeout: float = 30.0
    maximum_associations: int = 10
    max_wait_seconds: float = 3600.0
    dicom_outputs: tuple[str, ...] = ("seg", "rtstruct")
    keep_done_days: float = 1.0
    keep_failed_days: float = 30.0
    max_instance_mb: float = 2048.0
    max_study_mb: float = 32768.0
    min_free_disk_mb: float = 2048.0
    log_max_mb: float = 100.0
    log_backups: int = 5
    file_mode: int | None = None

    @property
    def destinations(self) -> tuple[Destination, ...]:
        """Every destination (``destination`` is one, or a list from ``[[destination]]`` tables)."""
        return (self.destination,) if isinstance(self.destination, Destination) else tuple(self.destination)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ae_title", check_ae_title("ae_title", self.ae_title))
        _check_port("port", self.port)
        aets = self.allowed_calling_aets
        if isinstance(aets, str) or not isinstance(aets, list | tuple) or not aets:
            raise ValueError(f"allowed_calling_aets must be a non-empty list of AE titles, got {aets!r}")
        object.__setattr__(
            self,
            "allowed_calling_aets",
            tuple(check_ae_title(f"allowed_calling_aets[{i}]", a) for i, a in enumerate(aets)),
        )
        dests = (self.destination,) if isinstance(self.destination, Destination) else self.destination
        if not isinstance(dests, list | tuple) or not dests or not all(isinstance(d, Destination) for d in dests):
            raise TypeError(f"destination must be a Destination or a non-empty list of them, got {self.destination!r}")
        object.__setattr__(self, "spool_dir", Path(self.spool_dir))
        _check_positive("idle_seconds", self.idle_seconds, allow_zero=True)
        _check_positive("retry_base_seconds", self.retry_base_seconds)
        _check_positive("retry_max_seconds", self.retry_max_seconds)
        _check_positive("network_timeout", self.network_timeout)
        for name in ("max_wait_seconds", "max_instance_mb", "max_study_mb"):
            _check_positive(name, getattr(self, name))
        for name in ("keep_done_days", "keep_failed_days", "min_free_disk_mb", "log_max_mb"):
            _check_positive(name, getattr(self, name), allow_zero=True)
        object.__setattr__(self, "dicom_outputs", _check_outputs(self.dicom_outputs))
        for d in dests:
            extra = [k for k in d.outputs if k not in self.dicom_outputs]
            if extra:
                raise ValueError(f"destination {d} asks for {extra}, not in dicom_outputs {list(self.dicom_outputs)}")
        object.__setattr__(self, "file_mode", _check_file_mode(self.file_mode))
        for name in ("max_send_attempts", "max_runs", "maximum_associations", "log_backups"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("model", "backend", "bind"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty string, got {getattr(self, name)!r}")


def load_config(path: str | Path) -> ServeOptions:
    """Read a node configuration from a ``.toml`` or ``.json`` file.

    Args:
        path: the configuration file.

    Returns:
        The checked options; a relative ``spool_dir`` is taken relative to the file's folder.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: unknown suffix, a syntax error, an unknown or missing key, or a bad value (named).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"serve config {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".toml":
            raw = tomllib.loads(text)
        elif path.suffix.lower() == ".json":
            raw = json.loads(text)
        else:
            raise ValueError(f"serve config {path} must end in .toml or .json, got {path.suffix!r}")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"serve config {path} is not valid {path.suffix[1:].upper()}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"serve config {path} must hold a table/object at the top, got {type(raw).__name__}")
    known = {f.name for f in fields(ServeOptions)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"serve config {path}: unknown key(s) {unknown}; known keys are {sorted(known)}")
    missing = sorted(
        k for k in ("ae_title", "port", "allowed_calling_aets", "destination", "spool_dir") if k not in raw
    )
    if missing:
        raise ValueError(f"serve config {path}: missing required key(s) {missing}")
    dests = raw["destination"]
    for dest in dests if isinstance(dests, list) else [dests]:
        if not isinstance(dest, dict) or not {"ae_title", "host", "port"} <= set(dest) <= {*_DESTINATION_KEYS}:
            raise ValueError(
                f"serve config {path}: destination must have the keys ae_title, host, port (and optionally "
                f"outputs), got {dest!r}"
            )
    values = dict(raw)
    try:
        if isinstance(dests, list):
            values["destination"] = tuple(Destination(**{**d, "outputs": tuple(d.get("outputs", ()))}) for d in dests)
        else:
            values["destination"] = Destination(**{**dests, "outputs": tuple(dests.get("outputs", ()))})
    except (TypeError, ValueError) as exc:
        raise ValueError(f"serve config {path}: {exc}") from exc
    spool = Path(raw["spool_dir"]).expanduser()
    values["spool_dir"] = spool if spool.is_absolute() else (path.parent / spool).resolve()
    for key in ("allowed_calling_aets", "dicom_outputs"):
        if isinstance(values.get(key), list):
            values[key] = tuple(values[key])
    try:
        return ServeOptions(**values)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"serve config {path}: {exc}") from exc
