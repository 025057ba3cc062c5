"""The KServe v2 / Triton gRPC protocol: ``grpc_service.proto`` and the modules generated from it.

Regenerate them with ``python -m llmcore.kserve.proto.regenerate`` (needs grpcio-tools).
"""
