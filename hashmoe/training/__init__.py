"""Training hashmoe models, split as t5x splits its trainer (the entry points are `hashmoe.train`).

  optim.py        the learning-rate schedule and the optimizer (AdamW, clipping, a frozen part).
  trainer.py      the loss, `TrainState`, `Trainer` (init and the jitted train/eval steps) and
                  `Evaluator` (validation perplexity on fixed batches).
  checkpoints.py  `Checkpointer` (orbax: state, data position, hash-table metadata, config),
                  checksums and layout checks, `restore_params`, `token_embeddings`.
  metrics.py      `MetricsLogger` (metrics.jsonl, eval.jsonl, TensorBoard) and its JSON rules.
  resume.py       what a checkpoint fixes (`run_settings`) and what a resumed run changed
                  (`check_resume`, `gin_config_changes`).
  run_dir.py      MODEL_DIR: the names of what a run writes there, its lock (`ModelDirLock`), and
                  what a fresh or resumed run does to an earlier run's files.
  multihost.py    JSON values exchanged between the processes of a run, and their encoding.
  errors.py       the errors a run raises (usage errors vs runtime failures).

Hash tables (build, load, verify, describe) are `hashmoe.tables`; the seqio input pipeline is
`hashmoe.data.pipeline`.
"""
