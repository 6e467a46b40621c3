"""The `mlxq` command line: the top floor, which may import api, worker and the shared package (none of them imports it)."""
