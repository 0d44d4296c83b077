"""The errors a training run raises, by what the user does about them.

`ConfigError` and its subclasses are usage errors (the CLI prints the message alone and exits 2);
the rest are runtime failures (exit 1). They live apart from the modules that raise them because
several do (the loop, the checkpoints, the tables, the input pipeline) and the CLI tells them
apart.
"""


class ConfigError(ValueError):
  """A setting or input the user must change before the run can go on (a usage error: the CLI
  prints the message alone and exits 2). Runtime failures (a diverged loss, an unreadable
  checkpoint, a full disk) are other exceptions and exit 1."""


class ChangedConfigError(ConfigError):
  """A resumed run differs from its checkpoint in a setting a checkpoint fixes (`run_settings`)."""


class ModelDirInUseError(ConfigError):
  """Another run holds MODEL_DIR's lock (`ModelDirLock`)."""


class LossDivergedError(FloatingPointError):
  """The training loss became NaN/inf or rose past the divergence bound; nothing after the last
  good checkpoint was saved."""


NonFiniteLossError = LossDivergedError  # The earlier name (NaN/inf only), kept for callers.


class CheckpointError(RuntimeError):
  """No checkpoint in a directory could be restored, or one does not fit the current run."""


class IncompatibleCheckpointError(CheckpointError):
  """A readable checkpoint holds another model or optimizer than the run's config describes.

  Not a corruption: older checkpoints of the directory would not fit either, so the run stops
  instead of falling back (and nothing is moved aside)."""
