"""`hashmoe compare`: train several models under identical conditions and compare them.

    hashmoe compare                      # dense vs Switch vs Hash on the embedded corpus (~10 min)
    hashmoe compare --quick              # the same, smaller (~2 min): a smoke check
    hashmoe compare --experiment hash_functions   # a paper experiment (configs/experiments/*.gin)
    hashmoe compare --text-dir ~/texts --models dense,hash --experts 32 --seeds 3 --out /tmp/cmp

What "identical conditions" means here (Roller et al. 2021, Section 5.1: hash and Switch layers
replace one FFN of the same Baseline, with the same training recipe):
  * data: every model of seed s reads the very same training batches, materialised once
    (`hashmoe.data.cached.CachedPipeline`) from the seqio task, and is evaluated on the same fixed
    validation (and test) batches;
  * steps, batch, sequence length, optimizer and schedule: one `Settings` for the whole comparison,
    and `hashmoe train`'s optimiser as configs/runs/compare.gin binds it;
  * active compute: every sparse layer replaces the FFN of the same dense model by E experts the
    size of that FFN, one of which each token uses. Active parameters are equal to the dense
    model's (hash: exactly; Switch/BASE: plus the d_model x E router) — `param_counts` proves it
    in the printed table.
  * Switch's load-balancing coefficient is tuned on validation perplexity as the paper does
    ("Load balancing for Switch is optimised on the validation set", Section 5.1): each value of
    the grid trains seed 0, the best is kept and trained on the remaining seeds
    (`select_balance_coef`).

Models are `ModelSpec`s (a `hashmoe.routers` config, as a model file binds it, and the
comparison's overrides: a table, the experts, the sparse layers, ...) applied to a base model gin
file of the chosen scale (`configs/models/tiny/baseline.gin` by default). An `Experiment` is a list of
ModelSpecs plus settings that the experiment fixes; the paper's sweeps are gin files under
`configs/experiments/` (`load_experiment`). Hash functions that need a trained dense model
(clustered and dispersed tables: k-means over its token embeddings; the predicted-future key: its
argmax next-token predictions) use the experiment's dense baseline run of the same seed, which is
trained first.

Each run is a normal `hashmoe.train.train` run in `OUT/runs/<model>/<seed>[-coef<c>]/` (its
metrics.jsonl, eval.jsonl, checkpoints). After training, one extra pass over the fixed validation
and test batches measures the test perplexity and the per-expert load over real tokens (padding
excluded), as the routers count it. A finished run leaves `run.json`; running the same command
again reuses finished runs and resumes an interrupted one from its checkpoint. Ctrl-C or SIGTERM
stops the comparison after the current step, says which models finished and writes the partial
`OUT/results.json`.

Outputs in OUT: results.json (schema in `Comparison.results_json`), valid_ppl.png/.json
(validation perplexity against steps), load_<model>.png/.json per sparse model and
load_all.png/.json (the paper's Figure 4), and the printed table (also in table.txt).

The modules, in the order a comparison uses them:
  specs       Settings, ModelSpec, Experiment, the presets and the experiment files;
  configs     a spec's model config, every run's optimiser (configs/runs/compare.gin) and mesh;
  runs        RunRequest and RunRecord, and reading a run's files;
  runner      TrainRunner: trains one run and measures it;
  comparison  Comparison: all runs, the Switch coefficient's tuning, results.json;
  parallel    the runs in worker processes (`--jobs`), each writing what the sequential path would;
              each seed's batches are read once and kept in the hashmoe cache
              (`hashmoe.data.cached.batch_cache_file`) for the next comparison of the same data;
  report      the table and the figures;
  cli         the command line.

Every `hashmoe` command builds compare's flags, and most never compare: this package exports the
names of the light modules (specs, runs, cli: no JAX, no TensorFlow); configs, runner, comparison
and report, which import the trainer, JAX and matplotlib, are imported by name where they are used
(`from hashmoe.compare import comparison`).
"""
from hashmoe.compare.cli import (EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_USAGE, add_arguments,
                                 main, resolve, run)
from hashmoe.compare.runs import (RunRecord, RunRequest, Runner, Stopped, read_jsonl, throughput,
                                  validation_curve)
from hashmoe.compare.specs import (BASES, DEFAULT_MODELS, EXPERIMENTS_SUBDIR, PRESET_NAMES,
                                   PRESETS, SCALES, TABLE_KINDS, Experiment, ModelSpec, Settings,
                                   configs_dir, default_experiment, experiment_path,
                                   list_experiments, load_experiment, model_preset)

__all__ = [
    "BASES", "DEFAULT_MODELS", "EXIT_INTERRUPTED", "EXIT_TERMINATED", "EXIT_USAGE",
    "EXPERIMENTS_SUBDIR", "PRESETS", "PRESET_NAMES", "SCALES", "TABLE_KINDS", "Experiment",
    "ModelSpec", "RunRecord", "RunRequest", "Runner", "Settings", "Stopped", "add_arguments",
    "configs_dir", "default_experiment", "experiment_path", "list_experiments", "load_experiment",
    "main", "model_preset", "read_jsonl", "resolve", "run", "throughput", "validation_curve",
]
