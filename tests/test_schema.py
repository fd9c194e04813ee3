"""The schema: the committed generated module matches proto/netforge.proto, field numbers are
Caffe's, and messages written here parse as Caffe's would (wire compatibility)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from netforge.proto import pb
from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))


def serialized_descriptor(path: Path) -> bytes:
    text = path.read_text()
    m = re.search(r"AddSerializedFile\((b'.*?')\)", text, re.S)
    assert m, f"no serialized descriptor in {path}"
    return eval(m.group(1))  # a bytes literal written by protoc


def test_committed_module_matches_proto(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    import gen_proto

    fresh = gen_proto.generate(tmp_path)
    assert serialized_descriptor(fresh) == serialized_descriptor(gen_proto.TARGET), (
        "netforge/proto/netforge_pb2.py is stale: run python scripts/gen_proto.py")


@pytest.mark.parametrize(("message", "field", "number"), [
    ("NetParameter", "layer", 100), ("NetParameter", "layers", 2),
    ("NetParameter", "force_backward", 5), ("NetParameter", "state", 6),
    ("LayerParameter", "name", 1), ("LayerParameter", "type", 2),
    ("LayerParameter", "bottom", 3), ("LayerParameter", "top", 4),
    ("LayerParameter", "loss_weight", 5), ("LayerParameter", "param", 6),
    ("LayerParameter", "blobs", 7), ("LayerParameter", "include", 8),
    ("LayerParameter", "exclude", 9), ("LayerParameter", "phase", 10),
    ("LayerParameter", "propagate_down", 11), ("LayerParameter", "transform_param", 100),
    ("LayerParameter", "convolution_param", 106), ("LayerParameter", "data_param", 107),
    ("LayerParameter", "inner_product_param", 117), ("LayerParameter", "pooling_param", 121),
    ("SolverParameter", "net", 24), ("SolverParameter", "base_lr", 5),
    ("SolverParameter", "lr_policy", 8), ("SolverParameter", "max_iter", 7),
    ("SolverParameter", "type", 40), ("SolverParameter", "weights", 42),
    ("SolverParameter", "random_seed", 20), ("SolverParameter", "iter_size", 36),
    ("SolverState", "iter", 1), ("SolverState", "history", 3),
    ("SolverState", "current_step", 4),
    ("Datum", "channels", 1), ("Datum", "data", 4), ("Datum", "label", 5),
    ("Datum", "float_data", 6), ("Datum", "encoded", 7),
    ("BlobProto", "shape", 7), ("BlobProto", "data", 5), ("BlobProto", "num", 1),
    ("ParamSpec", "name", 1), ("ParamSpec", "share_mode", 2), ("ParamSpec", "lr_mult", 3),
    ("ParamSpec", "decay_mult", 4), ("FillerParameter", "variance_norm", 8),
])
def test_caffe_field_numbers(message: str, field: str, number: int) -> None:
    assert getattr(pb, message).DESCRIPTOR.fields_by_name[field].number == number


def test_netforge_extensions_cannot_collide() -> None:
    """Fields not in Caffe's schema live at 10000 and above."""
    for desc in pb.DESCRIPTOR.message_types_by_name.values():
        for f in desc.fields:
            if f.number >= 10000:
                assert f.number < 20000


def test_defaults_are_caffes() -> None:
    sp = pb.SolverParameter()
    assert (sp.type, sp.regularization_type, sp.delta, sp.momentum2, sp.rms_decay) == (
        "SGD", "L2", pytest.approx(1e-8), pytest.approx(0.999), pytest.approx(0.99))
    assert (sp.iter_size, sp.average_loss, sp.clip_gradients, sp.random_seed) == (1, 1, -1, -1)
    assert sp.test_initialization and sp.snapshot_after_train
    assert pb.ParamSpec().lr_mult == 1 and pb.ParamSpec().decay_mult == 1
    assert pb.NetState().phase == pb.TEST
    assert pb.FillerParameter().type == "constant"


def test_datum_bytes_are_caffes() -> None:
    """A Datum serialized by hand in Caffe's wire format parses, and ours serializes alike."""
    d = pb.Datum(channels=1, height=2, width=2, data=b"\x01\x02\x03\x04", label=7)
    wire = bytes([0x08, 1, 0x10, 2, 0x18, 2, 0x22, 4, 1, 2, 3, 4, 0x28, 7])
    assert d.SerializeToString() == wire
    assert pb.Datum.FromString(wire) == d
