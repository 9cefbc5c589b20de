"""Compressed transfer syntaxes into the DICOM node: dcmtk's storescu (``/usr/bin``, the ``-x…`` proposal that
matches each syntax) sends a phantom PET/CT study encoded by dcmtk (``dcmcjpeg``, ``dcmcjpls``, ``dcmcrle``,
``dcmconv``) or GDCM (JPEG 2000); the node keeps each instance as sent, and the received study reads through
``runtime/dicom`` (``read_pet_ct``) to the same CT (HU) and PET (SUVbw) arrays as the uncompressed original.

A syntax the node cannot decode is refused at association time: its presentation context is rejected (storescu
reports "No Acceptable Presentation Contexts"; pynetdicom sees result 4, transfer syntaxes not supported) and
nothing reaches the spool.

References: the uncompressed originals (voxel-for-voxel, exact, for the lossless syntaxes); PS3.8 Table 9-18
(presentation context results).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_net import NodeProcess, dcmtk, encoded_copy, free_port, netns_unavailable_reason, serve_options

from diffseg.runtime.dicom import codecs, read_pet_ct
from diffseg.runtime.serve import JobQueue, Spool

pytestmark = pytest.mark.dicom_net

_REASON = netns_unavailable_reason()
if _REASON is not None:
    pytest.skip(f"DICOM network tests skipped: {_REASON}", allow_module_level=True)

# name: (encoder, storescu proposal option, transfer syntax UID)
SYNTAXES = {
    "jpeg_lossless_sv1": (["/usr/bin/dcmcjpeg", "+e1"], "-xs", "1.2.840.10008.1.2.4.70"),
    "jpeg_ls_lossless": (["/usr/bin/dcmcjpls", "+el"], "-xt", "1.2.840.10008.1.2.4.80"),
    "jpeg2000_lossless": ("gdcm", "-xv", "1.2.840.10008.1.2.4.90"),
    "rle_lossless": (["/usr/bin/dcmcrle"], "-xr", "1.2.840.10008.1.2.5"),
    "deflated": (["/usr/bin/dcmconv", "+td"], "-xd", "1.2.840.10008.1.2.1.99"),
    "explicit_big_endian": (["/usr/bin/dcmconv", "+tb"], "-xb", "1.2.840.10008.1.2.2"),
}


@pytest.fixture(scope="module")
def node(netns, tmp_path_factory):
    proc = NodeProcess(tmp_path_factory.mktemp("codec-node"), free_port(), {"idle_seconds": 3600.0}).start()
    yield proc
    assert proc.stop() == 0, proc.stderr_path.read_text()[-2000:]


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """A small phantom PET/CT study (8 CT slices of 64², 8 PET slices), uncompressed, and what it reads as."""
    from diffseg.runtime.dicom import write_phantom_dicom
    from diffseg.runtime.phantom import PhantomOptions, make_phantom

    root = tmp_path_factory.mktemp("original")
    write_phantom_dicom(make_phantom(1, PhantomOptions(ct_size_xy=64, ct_slices=8)), root)
    return root, read_pet_ct(root)


@pytest.mark.parametrize("name", list(SYNTAXES))
def test_storescu_study_in_each_syntax_reads_back_voxel_exact(
    name: str, node: NodeProcess, original, tmp_path: Path
) -> None:
    encoder, proposal, syntax = SYNTAXES[name]
    assert syntax in codecs.decodable_transfer_syntaxes(), f"{name} is not decodable in this installation"
    source, reference = original
    study_uid = encoded_copy(source, tmp_path, encoder)
    sent = sorted((tmp_path / "sent").rglob("*.dcm"))
    assert {str(pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID) for p in sent} == {syntax}
    folder, port = str(tmp_path / "sent"), str(node.port)
    result = dcmtk("storescu", "-aet", "PACS", "-aec", "NODE", proposal, "+sd", "+r", "127.0.0.1", port, folder)
    assert result.returncode == 0, result.stdout + result.stderr
    study_dir = Spool(node.spool).study_dir(study_uid)
    stored = sorted(study_dir.glob("*.dcm"))
    assert len(stored) == len(sent) == 16
    # kept as sent: the node does not transcode
    assert {str(pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID) for p in stored} == {syntax}
    received = read_pet_ct(study_dir)
    assert received.ct.array.dtype == reference.ct.array.dtype
    np.testing.assert_array_equal(received.ct.array, reference.ct.array)  # lossless: exact HU
    np.testing.assert_array_equal(received.pet.array, reference.pet.array)  # and exact SUVbw
    for key in ("spacing", "origin", "direction"):
        assert getattr(received.ct, key) == getattr(reference.ct, key)
    # every plugin that claims the syntax decodes it to the original pixels (not only the one pydicom tries first)
    (support,) = [s for s in codecs.transfer_syntax_support() if s.uid == syntax]
    plain = {_sop(p): p for p in (tmp_path / "plain").rglob("*.dcm")}
    for sample in (stored[0], stored[-1]):
        want = pydicom.dcmread(plain[_sop(sample)]).pixel_array
        for plugin in support.plugins if pydicom.uid.UID(syntax).is_compressed else ():
            got = pydicom.pixels.pixel_array(sample, decoding_plugin=plugin)
            np.testing.assert_array_equal(got, want, err_msg=f"{name} decoded by {plugin}")


def _sop(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_jpeg_lossless_process_14_from_pynetdicom(node: NodeProcess, original, tmp_path: Path) -> None:
    """Process 14 with selection value 6 (dcmcjpeg +el): storescu has no proposal for it, pynetdicom proposes
    each file's own syntax."""
    from dicom_net import store_files

    syntax = "1.2.840.10008.1.2.4.57"
    assert syntax in codecs.decodable_transfer_syntaxes()
    source, reference = original
    study_uid = encoded_copy(source, tmp_path, ["/usr/bin/dcmcjpeg", "+el"])
    sent = sorted((tmp_path / "sent").rglob("*.dcm"))
    assert store_files(sent, node.port) == [0x0000] * len(sent)
    received = read_pet_ct(Spool(node.spool).study_dir(study_uid))
    np.testing.assert_array_equal(received.ct.array, reference.ct.array)
    np.testing.assert_array_equal(received.pet.array, reference.pet.array)


def _undecodable() -> str:
    for uid in ("1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.92"):
        if uid not in codecs.decodable_transfer_syntaxes():
            return uid
    raise AssertionError("every candidate syntax is decodable here")


def test_a_syntax_no_decoder_handles_is_rejected_at_association(node: NodeProcess) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    syntax = _undecodable()
    client = AE(ae_title="PACS")
    client.add_requested_context(CTImageStorage, [syntax])
    client.add_requested_context(CTImageStorage, ["1.2.840.10008.1.2.1"])
    assoc = client.associate("127.0.0.1", node.port, ae_title="NODE")
    assert assoc.is_established
    try:
        rejected = [(str(cx.abstract_syntax), cx.result) for cx in assoc.rejected_contexts]
        accepted = [(str(cx.abstract_syntax), cx.transfer_syntax[0]) for cx in assoc.accepted_contexts]
    finally:
        assoc.release()
    assert rejected == [(str(CTImageStorage), 0x04)]  # transfer syntaxes not supported
    assert accepted == [(str(CTImageStorage), "1.2.840.10008.1.2.1")]


def test_the_node_offers_only_what_it_decodes_storescu_is_refused(netns, original, tmp_path: Path, monkeypatch) -> None:
    """With JPEG Lossless SV1 taken out of the codec list (as in an installation without GDCM), a storescu that
    proposes only SV1 gets no presentation context, and nothing lands in the spool."""
    from diffseg.runtime.serve.scp import StorageSCP

    monkeypatch.setattr(codecs, "decodable_transfer_syntaxes", lambda: codecs.UNCOMPRESSED)
    encoded_copy(original[0], tmp_path / "study", ["/usr/bin/dcmcjpeg", "+e1"])
    config = tmp_path / "sv1-only.cfg"
    config.write_text(
        "[[TransferSyntaxes]]\n[SV1]\nTransferSyntax1 = JPEGLossless:Non-hierarchical-1stOrderPrediction\n"
        "[[PresentationContexts]]\n[SV1Only]\nPresentationContext1 = CTImageStorage\\SV1\n"
        "PresentationContext2 = PositronEmissionTomographyImageStorage\\SV1\n"
        "[[Profiles]]\n[SV1Only]\nPresentationContexts = SV1Only\n"
    )
    options = serve_options(tmp_path / "spool")
    spool = Spool(options.spool_dir).create()
    queue = JobQueue(spool.db_path)
    scp = StorageSCP(options, spool, queue)
    (ct,) = [cx for cx in scp.ae.supported_contexts if cx.abstract_syntax == "1.2.840.10008.5.1.4.1.1.2"]
    assert ct.transfer_syntax == list(codecs.UNCOMPRESSED)
    scp.start()
    try:
        sent = tmp_path / "study" / "sent"
        result = dcmtk(
            "storescu", "-aet", "PACS", "-aec", "NODE", "-xf", str(config), "SV1Only", "+sd", "+r",
            "127.0.0.1", str(scp.port), str(sent),
        )  # fmt: skip
    finally:
        scp.stop()
        queue.close()
    assert result.returncode != 0
    assert "No Acceptable Presentation Contexts" in result.stdout + result.stderr
    assert [p for p in spool.incoming.rglob("*")] == []
