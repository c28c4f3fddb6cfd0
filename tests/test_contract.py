"""The contract and the generated artefacts stay in step with their sources."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from google.protobuf import descriptor_pb2

from twostage.v1 import twostage_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent


def test_generated_proto_code_is_current():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_configuration_docs_are_current():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_config_docs.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_service_covers_the_required_rpcs():
    methods = {m.name for m in pb.DESCRIPTOR.services_by_name["TwoStage"].methods}
    assert {"Search", "Rerank", "Embed", "Upsert", "Delete", "Info"} <= methods
    assert pb.DESCRIPTOR.package == "twostage.v1"


def test_every_field_and_message_is_documented():
    """Every message, field, enum value and RPC in the .proto carries a comment."""
    from grpc_tools import protoc
    import grpc_tools
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.pb"
        well_known = Path(grpc_tools.__file__).parent / "_proto"
        assert protoc.main(["protoc", f"-I{ROOT / 'protos'}", f"-I{well_known}", "--include_source_info",
                            f"--descriptor_set_out={out}", "twostage/v1/twostage.proto"]) == 0
        fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    f = fds.file[0]
    documented = {tuple(loc.path) for loc in f.source_code_info.location if loc.leading_comments.strip()}
    missing = []
    for mi, msg in enumerate(f.message_type):
        for fi, fld in enumerate(msg.field):
            if (4, mi, 2, fi) not in documented:
                missing.append(f"{msg.name}.{fld.name}")
    for ei, enum in enumerate(f.enum_type):
        for vi, val in enumerate(enum.value):
            if (5, ei, 2, vi) not in documented:
                missing.append(f"{enum.name}.{val.name}")
    for si, svc in enumerate(f.service):
        for mi, m in enumerate(svc.method):
            if (6, si, 2, mi) not in documented:
                missing.append(f"{svc.name}.{m.name}")
    assert not missing, f"undocumented: {missing}"


def test_index_module_can_be_imported_before_onnxruntime():
    """usearch 2.26 then onnxruntime 1.32 segfaults; server/index.py loads onnxruntime first."""
    r = subprocess.run([sys.executable, "-c", "import twostage.server.index; import onnxruntime; print('ok')"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, (r.returncode, r.stderr[-2000:])
