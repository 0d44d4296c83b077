"""What t5x needs to train hashmoe models from gin (`python -m t5x.train`).

  models.py        `HashMoeDecoderOnlyModel`, `HashMoeEncoderDecoderModel`: t5x's model classes
                   over hashmoe's Flax modules (aux losses in the loss, hash tables as t5x
                   `flax_mutables`, scoring and cached decoding).
  partitioning.py  `HashMoePartitioner`: t5x's pjit partitioner on hashmoe's ("data", "expert",
                   "model") mesh with hashmoe's logical-axis rules.
  data.py          a task's vocabulary and the hash layers' initial tables, for the gin files.

The gin files are configs/t5x/ (see their headers). t5x is not a dependency of hashmoe: it is not on
PyPI, and only this subpackage imports it.

Importing this package (the t5x gin files do, on their first lines) does two things for gin:
  * imports the modules that register hashmoe's configurables (`gin_utils.CONFIGURABLE_MODULES`:
    `hashmoe.models.*`, `hashmoe.train.*`, `hashmoe.data.*`), which hashmoe's own model and task
    gin files bind (the model files bind `hashmoe.train.train.hash_tables` too, so the trainer's
    entry point is among them);
  * adds hashmoe's configs/ folder to gin's include search path. t5x resolves `include` lines only
    through search paths (`--gin_search_paths`, default '.'), and hashmoe's gin files include each
    other relative to configs/ (`include 'models/tiny/baseline.gin'`), as `hashmoe train` does.
"""
import gin

from hashmoe import gin_utils as _gin_utils

_gin_utils.register_configurables()
_CONFIGS = _gin_utils.configs_dir()
if _CONFIGS is not None:
  gin.add_config_file_search_path(str(_CONFIGS))
