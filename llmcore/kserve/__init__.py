"""The KServe v2 open inference protocol (Triton's), a model repository, and run-time load/unload.

- :mod:`~llmcore.kserve.repository`: the repository layout and its config files.
- :mod:`~llmcore.kserve.registry`: :class:`LiveModels`, the models served now, by name and version.
- :mod:`~llmcore.kserve.textgen`: the text-generation tensors of Triton's vLLM backend.
- :mod:`~llmcore.kserve.service`: the protocol's operations; :mod:`~llmcore.kserve.http` and
  :mod:`~llmcore.kserve.grpc_server` put them on HTTP and gRPC.
- :mod:`~llmcore.kserve.serve`: the options and set-up ``llmcore serve`` uses; :mod:`~llmcore.kserve.cli`:
  ``llmcore repo index|load|unload``.

Needs the ``serve`` extra (fastapi, grpcio, protobuf). See docs/triton.md.
"""
