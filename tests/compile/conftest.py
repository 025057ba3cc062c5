from tests.compile.fixtures import compiled_tiny, isolated_cache_env  # noqa: F401  (fixtures)
