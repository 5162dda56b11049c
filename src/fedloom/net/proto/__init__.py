"""Generated gRPC/protobuf code for ``fedloom.proto`` (regenerate with ``python -m grpc_tools.protoc``).

Regenerate from the repository root::

    python -m grpc_tools.protoc -Isrc --python_out=src --grpc_python_out=src --pyi_out=src \\
        src/fedloom/net/proto/fedloom.proto
"""
