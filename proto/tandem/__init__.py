"""Tandem's public API: the protobuf messages and gRPC stubs generated from proto/tandem/."""
