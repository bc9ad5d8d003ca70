"""Ray Data pipelines: raw pose datasets -> Parquet sliding-window shards with a manifest.

    from pipelines import build_shards, read_split, load_manifest, manifest_hash, TENSOR_COLUMNS

See `pipelines.shards` for the format, `pipelines.build` for the build, `pipelines.sources` for the readers.
Importing this package does not import Ray.
"""

from pipelines.build import build_shards
from pipelines.config import PreprocessConfig
from pipelines.shards import TENSOR_COLUMNS, load_manifest, manifest_hash, read_split

__all__ = ["TENSOR_COLUMNS", "PreprocessConfig", "build_shards", "load_manifest", "manifest_hash", "read_split"]
