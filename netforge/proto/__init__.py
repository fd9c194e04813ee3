"""The generated protobuf module for netforge's Caffe-compatible schema (proto/netforge.proto)."""

from netforge.proto import netforge_pb2 as pb

__all__ = ["pb"]
