"""The transfer syntaxes whose pixel data this installation can decode, as pydicom's decoders report them.

Nothing here is a fixed claim: each syntax is looked up with ``pydicom.pixels.decoders.get_decoder(uid)``, and a
syntax counts as decodable when one of its plugins imports here (``is_available``). pydicom 3 decodes the
uncompressed syntaxes, Deflated Explicit VR Little Endian, Explicit VR Big Endian and RLE Lossless itself; the
compressed ones need a plugin package: python-gdcm (JPEG Lossless Process 14 and SV1, JPEG Baseline, JPEG-LS,
JPEG 2000), Pillow (JPEG Baseline, JPEG 2000), pyjpegls (JPEG-LS), pylibjpeg with its plugins (pylibjpeg-libjpeg:
JPEG incl. 12-bit Extended; pylibjpeg-openjpeg: JPEG 2000 and HTJ2K; pylibjpeg-rle).

One refinement is made on top of pydicom: JPEG Extended (Process 2 and 4, ``1.2.840.10008.1.2.4.51``) exists for
12-bit samples, and neither Pillow nor GDCM decodes those (pydicom's plugins refuse 12-bit precision; the GDCM
wheel is built without 12-bit IJG). That syntax therefore counts as decodable only with a plugin that decodes
12-bit samples (pylibjpeg), so that a node does not accept a 12-bit lossy CT it would fail to read later.

The DICOM node (``runtime/serve/scp.py``) accepts exactly :func:`decodable_transfer_syntaxes` for storage, and
``diffseg info`` lists :func:`transfer_syntax_support`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

__all__ = [
    "PARTIAL_PLUGINS",
    "UNCOMPRESSED",
    "TransferSyntaxSupport",
    "decodable_transfer_syntaxes",
    "transfer_syntax_support",
]

# Implicit VR LE, Explicit VR LE, Deflated Explicit VR LE, Explicit VR BE: decoded by pydicom itself.
UNCOMPRESSED = (
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.1.99",
    "1.2.840.10008.1.2.2",
)

#: Plugins that decode only part of a syntax: {syntax UID: {plugin: what it cannot do}}. A syntax whose only
#: available plugins are listed here does not count as decodable.
PARTIAL_PLUGINS: dict[str, dict[str, str]] = {
    "1.2.840.10008.1.2.4.51": {
        "pillow": "8-bit samples only (JPEG Extended is for 12-bit)",
        "gdcm": "8-bit samples only (JPEG Extended is for 12-bit)",
    },
}

# Syntaxes whose decoding reproduces the encoded pixels exactly (PS3.5 Annex A / 8.2).
_LOSSLESS = {
    *UNCOMPRESSED,
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless, Process 14
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless, Process 14 SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 (Lossless Only)
    "1.2.840.10008.1.2.4.201",  # HTJ2K (Lossless Only)
    "1.2.840.10008.1.2.4.202",  # HTJ2K with RPCL (Lossless Only)
    "1.2.840.10008.1.2.5",  # RLE Lossless
}


@dataclass(frozen=True)
class TransferSyntaxSupport:
    """Whether one transfer syntax's pixel data can be decoded here, and by what.

    Attributes:
        uid: the transfer syntax UID.
        name: its DICOM name.
        decodable: True when a plugin that decodes it fully imports here.
        plugins: the pydicom decoder plugins available for it here (``"pydicom"`` for its own decoders).
        missing: what would add a plugin, as pydicom says it (``"gdcm - requires gdcm>=3.0.10"``...).
        lossless: decoding gives back the encoded pixels exactly (a property of the syntax).
        note: a limitation of the available plugins, or "" (see ``PARTIAL_PLUGINS``).
    """

    uid: str
    name: str
    decodable: bool
    plugins: tuple[str, ...]
    missing: tuple[str, ...]
    lossless: bool
    note: str = ""

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready dict of the fields."""
        return {
            "uid": self.uid,
            "name": self.name,
            "decodable": self.decodable,
            "plugins": list(self.plugins),
            "missing": list(self.missing),
            "lossless": self.lossless,
            "note": self.note,
        }


def _support(uid: str) -> TransferSyntaxSupport | None:
    """The support of one syntax, or None when pydicom has no decoder for it at all (MPEG, HEVC...)."""
    from pydicom.pixels.decoders.base import get_decoder
    from pydicom.uid import UID

    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        return None
    plugins = tuple(decoder.available_plugins)
    if uid in UNCOMPRESSED or uid == "1.2.840.10008.1.2.5":
        plugins = plugins or ("pydicom",)  # native decoders carry no plugin name
    partial = PARTIAL_PLUGINS.get(uid, {})
    full = [p for p in plugins if p not in partial]
    note = "; ".join(f"{p}: {partial[p]}" for p in plugins if p in partial)
    return TransferSyntaxSupport(
        uid=uid,
        name=UID(uid).name,
        decodable=bool(decoder.is_available and full),
        plugins=plugins,
        missing=tuple(decoder.missing_dependencies),
        lossless=uid in _LOSSLESS,
        note=note,
    )


@functools.cache
def transfer_syntax_support() -> tuple[TransferSyntaxSupport, ...]:
    """Every transfer syntax pydicom has a pixel-data decoder for, with whether it is decodable here.

    The plugins are imported to find out (once per process: the result is cached).

    Returns:
        One entry per syntax, in pydicom's order of ``AllTransferSyntaxes`` (uncompressed first).
    """
    from pydicom.uid import AllTransferSyntaxes

    out = [_support(str(uid)) for uid in AllTransferSyntaxes]
    return tuple(s for s in out if s is not None)


def decodable_transfer_syntaxes() -> tuple[str, ...]:
    """The UIDs of the transfer syntaxes this installation decodes (see :func:`transfer_syntax_support`).

    The four of ``UNCOMPRESSED`` come first (Explicit VR Little Endian first; pydicom decodes them itself), then
    the compressed ones that a plugin here decodes.
    """
    found = [s.uid for s in transfer_syntax_support() if s.decodable]
    first = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2"]
    return tuple(dict.fromkeys([*[u for u in first if u in found], *found]))
