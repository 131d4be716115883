"""Generated protobuf and gRPC code (python -m tools.gen_proto). Never edit the *_pb2* files by hand."""
