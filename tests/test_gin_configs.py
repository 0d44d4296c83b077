"""Every gin file under configs/models, configs/tasks and configs/runs parses, finalises and builds.

Like flaxformer's gin_configs_test: a config can never rot unnoticed. Model files are a size
(models/{tiny,paper}/{baseline,wider,deeper}.gin), a router file given after a size
(models/routers/*.gin), or a preset that names one size and router for the docs' commands; each
size is built alone and with every router. Models are initialised abstractly (`jax.eval_shape` of
`model.init`; paper sizes are never materialised) and their parameter counts are checked against a
closed-form count of the architecture the files describe (the paper's Baseline: 219,043,840 =
219.0M without biases, Section 5.1). Task files are composed
with a model, run files with a model and a task, the way the command line composes them, and every
macro a run promises (MODEL_DIR, TRAIN_STEPS, BATCH_SIZE, SEQ_LEN, CHECKPOINT_PERIOD, EVAL_PERIOD,
SEED) is evaluated.

configs/experiments/ belongs to `hashmoe compare` and is tested with it.
"""
from __future__ import annotations

import math
from pathlib import Path

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hashmoe import cli, models, routers
from hashmoe.data import pipeline as pipeline_lib

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
MODEL_FILES = sorted(p.relative_to(CONFIGS).as_posix() for p in (CONFIGS / "models").rglob("*.gin"))
SIZES = ("baseline", "wider", "deeper")
ROUTER_FILES = [p for p in MODEL_FILES if p.startswith("models/routers/")]
# Files that name one size and one router, for the commands the docs and scripts print.
PRESETS = {"models/tiny/hash_16.gin": ("models/tiny/baseline.gin", "models/routers/hash.gin", 16),
           "models/paper/hash_64.gin": ("models/paper/baseline.gin", "models/routers/hash.gin", 64),
           "models/paper/hash_128.gin": ("models/paper/baseline.gin", "models/routers/hash.gin",
                                         128)}
# Whole layouts that set their own depth, experts and routers (DeepSeek-V4-style): parsed, built
# and counted alone.
LAYOUTS = ("models/tiny/deepseek_v4.gin", "models/large/deepseek_v4_like.gin")
# What a model is built from: a size alone, a size then a router file, or a preset.
MODEL_COMPOSITIONS = (
    [(f"models/{scale}/{size}.gin",) + router for scale in ("tiny", "paper") for size in SIZES
     for router in [()] + [(r,) for r in ROUTER_FILES]]
    + [(preset,) for preset in PRESETS])
TASK_FILES = sorted(p.relative_to(CONFIGS).as_posix() for p in (CONFIGS / "tasks").glob("*.gin"))
RUN_FILES = sorted(p.relative_to(CONFIGS).as_posix() for p in (CONFIGS / "runs").glob("*.gin"))
RUN_MACROS = ("MODEL_DIR", "TRAIN_STEPS", "BATCH_SIZE", "SEQ_LEN", "CHECKPOINT_PERIOD",
              "EVAL_PERIOD", "SEED")
# What the task files' required macros are bound to here (paths are never read).
TASK_BINDINGS = ["TEXT_DIR = '/nonexistent/texts'", "WIKITEXT_DIR = '/nonexistent/wikitext'",
                 "CC100_PATH = '/nonexistent/en.txt.xz'",
                 "REDDIT_COMMENTS = ['/nonexistent/RC_2019-01.zst']"]


@gin.configurable(module="test_gin_configs")
def probe(model_config=gin.REQUIRED, values=()):
  return model_config, list(values)


@pytest.fixture(autouse=True)
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def parse(files, bindings=(), values=()):
  # The data-path placeholders are bound for every file, read or not, so they bypass the CLI's
  # refusal of command-line macros nothing reads.
  extra = [b for b in bindings if b in TASK_BINDINGS]
  extra.append("test_gin_configs.probe.model_config = %MODEL_CONFIG")
  if values:
    extra.append(f"test_gin_configs.probe.values = [{', '.join('%' + v for v in values)}]")
  cli.parse_gin(files, [b for b in bindings if b not in TASK_BINDINGS], extra="\n".join(extra))
  return probe()


def abstract_param_count(config):
  model = models.build_model(config)
  batch = {"decoder_input_tokens": jax.ShapeDtypeStruct((1, 8), jnp.int32),
           "decoder_target_tokens": jax.ShapeDtypeStruct((1, 8), jnp.int32)}
  if config.is_encoder_decoder:
    batch["encoder_input_tokens"] = batch["decoder_input_tokens"]
  shapes = jax.eval_shape(lambda b: model.init(jax.random.key(0), b, deterministic=True), batch)
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(shapes["params"])))


def closed_form_count(c: models.TransformerConfig) -> int:
  """Parameters of the pre-norm transformer the config describes, counted by hand: tied token
  embeddings, learned positions per stack, attention q/k/v/o without biases, ReLU FFN without
  biases, LayerNorm scale+bias before every sublayer and at the end of each stack; a sparse FFN
  replaces D-wide W_in/W_out by E stacked experts plus its router's parameters."""
  d, inner = c.d_model, c.num_heads * c.head_dim
  attention, norm = 4 * d * inner, (2 * d if c.norm == "layernorm" else d)
  positions = c.max_len * d if c.position_embedding == "learned" else 0

  def ffn(ordinal):  # ordinal among the sparse layers, None for a dense FFN
    if ordinal is None:
      return 2 * d * c.d_ff
    s = c.sparse
    router = s.router
    if router.name == "first_layers":  # the first N sparse layers' router, then the rest's
      router = router.first if ordinal < router.first_layers else router.rest
    expert_d_ff = s.expert_d_ff or c.d_ff
    experts = s.num_experts * 2 * d * expert_d_ff
    shared = s.num_shared_experts * 2 * d * expert_d_ff
    router = {"hash": 0, "switch": d * s.num_experts, "hash_topk": d * s.num_experts,
              "topk": d * s.num_experts, "base": s.num_experts * d,
              "token_switch": c.vocab_size * d + d * s.num_experts}[router.name]
    return experts + shared + router

  sparse_dec = sorted(c.sparse.layers) if c.sparse else []
  total = c.vocab_size * d + positions  # tokens, decoder positions
  if not c.share_embeddings:
    total += d * c.vocab_size  # the output projection
  for i in range(c.num_layers):
    cross = attention + norm if c.is_encoder_decoder else 0
    ordinal = sparse_dec.index(i) if i in sparse_dec else None
    total += attention + norm + cross + ffn(ordinal) + norm
  total += norm
  if c.is_encoder_decoder:
    total += positions + norm
    total += c.num_encoder_layers * (attention + norm + ffn(None) + norm)
  return total


@pytest.mark.parametrize("files", MODEL_COMPOSITIONS, ids=lambda f: "+".join(
    p[len("models/"):-len(".gin")] for p in f))
def test_model_file_builds(files):
  config, _ = parse(list(files))
  assert isinstance(config, models.TransformerConfig)
  scale = files[0].split("/")[1]
  assert scale in ("paper", "tiny")
  if scale == "paper":  # the paper's shape: 11 decoder layers (22 for Deeper), d=1024, layer 7
    assert (config.d_model, config.num_encoder_layers) == (1024, 2)
    assert config.num_layers == (22 if files[0].endswith("deeper.gin") else 11)
    if config.sparse is not None:
      assert config.sparse.layers == (6,)
  assert (config.sparse is not None) == (len(files) > 1 or files[0] in PRESETS)
  count = abstract_param_count(config)
  assert count == closed_form_count(config)
  if files == ("models/paper/baseline.gin",):
    assert count == 219_043_840  # the paper's "222M" Baseline, less ParlAI's biases
  if config.sparse is not None:
    counts = models.param_counts(config)
    assert counts["total"] == count and counts["active"] < counts["total"]


def test_sizes_come_in_paper_and_tiny_pairs_and_every_router_has_a_file():
  for scale in ("tiny", "paper"):
    names = {p.split("/")[-1] for p in MODEL_FILES if p.startswith(f"models/{scale}/")}
    assert names == {f"{size}.gin" for size in SIZES} | {
        p.split("/")[-1] for p in tuple(PRESETS) + LAYOUTS if p.startswith(f"models/{scale}/")}
  families = set()
  for path in ROUTER_FILES:
    config, _ = parse(["models/tiny/baseline.gin", path])
    families.add(config.sparse.router.name)
    if path.endswith("multihash.gin"):
      assert config.sparse.router.num_hashes == 4
    if "/switch_" in path:  # switch_<combine>.gin: Switch with that combine weight
      assert config.sparse.router.combine == path.split("/switch_")[-1][:-len(".gin")]
  assert families == set(routers.REGISTRY)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_a_preset_is_its_size_and_router_file(preset):
  """A preset holds no settings of its own: it is its size and router file with NUM_EXPERTS."""
  size, router, experts = PRESETS[preset]
  config, _ = parse([preset])
  composed, _ = parse([size, router], [f"NUM_EXPERTS = {experts}"])
  assert config == composed and config.sparse.num_experts == experts


def test_a_router_file_after_a_preset_keeps_its_size_and_experts():
  """What configs/runs/cpu_tiny.gin's header suggests: a router file after the run swaps the
  router and keeps the model's size and NUM_EXPERTS."""
  config, _ = parse(["models/paper/hash_64.gin", "models/routers/token_switch.gin"])
  assert config.sparse.router == routers.TokenSwitch()
  assert (config.sparse.num_experts, config.d_model) == (64, 1024)


def test_flat_router_fields_are_refused_naming_their_new_binding():
  with pytest.raises(cli.UsageError, match=r"SparseConfig.hash_key moved to the router config: "
                     r"bind routers.Hash.key \(with SparseConfig.router = @routers.Hash\(\)\)"):
    parse(["models/tiny/hash_16.gin"], ["SparseConfig.hash_key = 'bigram'"])
  with pytest.raises(cli.UsageError, match=r"bind routers.Switch.balance_coef"):
    parse(["models/tiny/baseline.gin", "models/routers/switch.gin"],
          ["SparseConfig.balance_coef = 0.1"])
  # A family's name still stands for its defaults.
  config, _ = parse(["models/tiny/hash_16.gin"], ["SparseConfig.router = 'switch'"])
  assert config.sparse.router == routers.Switch()


@pytest.mark.parametrize("path", TASK_FILES)
def test_task_file_composes_with_a_model(path):
  config, (vocab_size,) = parse(["models/tiny/hash_16.gin", path], TASK_BINDINGS,
                                values=["VOCAB_SIZE"])
  assert config.vocab_size == vocab_size
  name = gin.query_parameter("hashmoe.train.task_name.name")
  shape = name.rsplit("_", 1)[1]
  assert name.startswith("hashmoe_") and shape in ("lm", "seq2seq")
  # LM tasks drop the encoder, seq2seq tasks keep the model file's.
  assert config.num_encoder_layers == (0 if shape == "lm" else 2)
  assert abstract_param_count(config) == closed_form_count(config)


def test_text_dir_task_registers_and_yields_batches(tmp_path, monkeypatch):
  """The one task file whose data a test can make: evaluating TASK registers the corpus's tasks
  (training a SentencePiece model on it) and names one that yields batches."""
  monkeypatch.setenv("HASHMOE_CACHE", str(tmp_path / "cache"))
  rng = np.random.default_rng(0)
  words = "the of and to in a is that for it as was with be by on not he this are".split()
  texts = tmp_path / "texts"
  texts.mkdir()
  for f in range(3):
    (texts / f"doc{f}.txt").write_text("\n\n".join(
        " ".join(rng.choice(words, size=12)) + "." for _ in range(60)) + "\n")
  # A prefix of its own: task names are process-global, other tests register other folders.
  cli.parse_gin(["models/tiny/baseline.gin", "tasks/text_dir_seq2seq.gin"],
                [f"TEXT_DIR = '{texts}'", "VOCAB_SIZE = 300",
                 "register_tasks.name_prefix = 'gintest'",
                 "task_name.name = 'gintest_text_seq2seq'",
                 "test_gin_configs.probe.model_config = %MODEL_CONFIG",
                 "test_gin_configs.probe.values = [%TASK]"])
  config, (task,) = probe()
  assert task == "gintest_text_seq2seq"
  pipeline = pipeline_lib.TaskPipeline(task, batch_size=2, seq_len=16)
  assert pipeline.vocab_size == config.vocab_size == 300
  batch = next(pipeline.train_batches(None))
  assert batch["encoder_input_tokens"].shape == (2, 16)
  models.validate_batch(batch, config.vocab_size, config.max_len)


def _includes_a_model(path):
  return "include 'models/" in (CONFIGS / path).read_text()


@pytest.mark.parametrize("path", RUN_FILES)
def test_run_file_binds_every_macro_and_the_trainer(path):
  files, bindings = [path], ["MODEL_DIR = '/tmp/model'"]
  if _includes_a_model(path):  # a big model's run: the command line adds only a task
    files = ["tasks/text_dir.gin" if "lm_" in path else "tasks/reddit.gin", path]
    bindings += TASK_BINDINGS
  elif path != "runs/cpu_tiny.gin":  # the others take a model and a task, as on the command line
    files = ["models/paper/hash_64.gin", "tasks/reddit.gin", path]
    bindings += TASK_BINDINGS
  if path == "runs/finetune.gin":
    bindings.append("INIT_CHECKPOINT = '/tmp/pretrained'")
  macros = RUN_MACROS if path != "runs/eval.gin" else ("MODEL_DIR", "BATCH_SIZE", "SEQ_LEN",
                                                        "SEED")
  config, values = parse(files, bindings, values=macros)
  assert all(v is not None for v in values), dict(zip(macros, values))
  target = "evaluate" if path == "runs/eval.gin" else "train"
  for arg in ("model_dir", "model_config", "task", "batch_size", "seq_len"):
    gin.query_parameter(f"hashmoe.train.{target}.{arg}")  # raises if unbound
  if target == "train":
    gin.query_parameter("hashmoe.train.train.train_steps")
    gin.query_parameter("hashmoe.train.train.optimizer")
  assert abstract_param_count(config) == closed_form_count(config)
  if path == "runs/cpu_tiny.gin":
    assert config.sparse.router == routers.Hash() and config.num_encoder_layers == 0
    assert config.vocab_size == 512


def test_the_big_models_have_their_paper_sizes_and_fsdp_runs():
  """The paper's 1.28B Hash-128 (Section 5.3.1) and the 4.5B LM with 3 hash layers of 128 experts
  in 25 layers (Section 5.3.4), counted in closed form; their run files turn FSDP on over an
  expert axis that divides the experts."""
  hash_128, _ = parse(["models/paper/hash_128.gin"])
  assert abs(closed_form_count(hash_128) - 1.28e9) < 0.01e9
  lm, _ = parse(["tasks/text_dir.gin", "models/large/lm_4_5b.gin"], TASK_BINDINGS +
                ["VOCAB_SIZE = 51200"])
  assert lm.num_encoder_layers == 0 and lm.num_layers == 25 and lm.vocab_size == 51200
  assert lm.sparse.num_experts == 128 and len(lm.sparse.layers) == 3
  count = abstract_param_count(lm)
  assert count == closed_form_count(lm) and abs(count - 4.5e9) < 0.05e9
  for run, task in (("runs/hash_128.gin", "tasks/reddit.gin"),
                    ("runs/lm_4_5b.gin", "tasks/text_dir.gin")):
    config, (fsdp, expert) = parse([task, run], TASK_BINDINGS + ["MODEL_DIR = '/tmp/m'"],
                                   values=["FSDP", "EXPERT_PARALLEL"])
    assert fsdp is True and config.sparse.num_experts % expert == 0, run
    assert gin.query_parameter("hashmoe.train.train.fsdp") is not None
  # What docs/PERFORMANCE.md measured to fit a 32 GiB v4 chip at 256 x 1024 tokens (the last
  # run parsed above is the 4.5B one).
  batch = gin.query_parameter("%BATCH_SIZE")
  assert (config.scan_layers, config.remat_policy, batch) == (True, "save_dispatch", 256)


@pytest.mark.parametrize("path", LAYOUTS)
def test_deepseek_v4_layouts_build_with_hash_layers_first(path):
  """The tiny DeepSeek-V4-style model and the paper-scale layout: every layer sparse, the first
  HASH_LAYERS of them hash top-k and the rest learned top-k, fine-grained and shared experts;
  counted in closed form (the large one abstractly: 490.9B parameters, 43.2B active)."""
  tiny = path.startswith("models/tiny/")
  # The large layout leaves vocabulary and encoder to the task, as models/large/lm_4_5b.gin does.
  config, _ = parse([path] if tiny else ["tasks/text_dir.gin", path],
                    [] if tiny else TASK_BINDINGS + ["VOCAB_SIZE = 129280"])
  s = config.sparse
  expected = ((4, 32, 32, 4, 2, 1, 64) if tiny else (61, 256, 2048, 6, 3, 1, 7168))
  assert (config.num_layers, s.num_experts, s.expert_d_ff, s.router.experts_per_token,
          s.router.first_layers, s.num_shared_experts, config.d_model) == expected
  assert s.layers == tuple(range(config.num_layers))
  kinds = [r.name for r in models.layer_routers(config).values()]
  assert kinds == ["hash_topk"] * expected[4] + ["topk"] * (expected[0] - expected[4])
  assert s.router.first.gate == "sqrt_softplus" and s.router.rest.bias_update_rate == 0.001
  assert gin.query_parameter("hashmoe.train.train.hash_tables") == "balanced_topk"
  counts = models.param_counts(config)
  assert counts["total"] == closed_form_count(config)
  # Active: all but the k of E routed experts of every sparse layer (shared ones always run).
  per_expert = 2 * config.d_model * s.expert_d_ff
  assert counts["total"] - counts["active"] == (
      config.num_layers * (s.num_experts - expected[3]) * per_expert)
  if not tiny:
    assert config.vocab_size == 129280 and config.num_encoder_layers == 0
    assert round(counts["total"] / 1e9, 1) == 490.9 and round(counts["active"] / 1e9, 1) == 43.2


def test_command_line_overrides_a_macro():
  _, (steps, model_dir) = parse(["runs/cpu_tiny.gin"], ["MODEL_DIR = '/tmp/x'",
                                                         "TRAIN_STEPS = 7"],
                                values=["TRAIN_STEPS", "MODEL_DIR"])
  assert (steps, model_dir) == (7, "/tmp/x")


def test_missing_model_dir_names_the_macro():
  with pytest.raises(Exception, match="MODEL_DIR"):
    parse(["runs/cpu_tiny.gin"], values=["MODEL_DIR"])


def test_gin_files_open_with_a_documentation_header():
  for path in MODEL_FILES + TASK_FILES + RUN_FILES:
    lines = (CONFIGS / path).read_text().splitlines()
    header = "\n".join(l for l in lines[:lines.index("")] if l.startswith("#")) if "" in lines \
        else ""
    comments = "\n".join(l for l in lines if l.startswith("#"))
    assert header.startswith("# "), path  # a title line first
    for field in ("What:", "Where from:", "Deviations:", "Macros"):
      assert field in comments, (path, field)
    assert max(len(line) for line in lines) <= 100, path


def test_includes_resolve_from_a_directory_holding_folders_named_like_config_folders(
    tmp_path, monkeypatch):
  # A user's own runs/ and models/ folders in the working directory are namespace packages on
  # sys.path; gin's package reader raised TypeError on them instead of trying the next folder.
  from hashmoe.compare import configs as compare_configs  # pylint: disable=g-import-not-at-top
  from hashmoe.compare import specs  # pylint: disable=g-import-not-at-top
  for name in ("runs", "models", "tasks"):
    (tmp_path / name).mkdir()
  monkeypatch.chdir(tmp_path)
  monkeypatch.syspath_prepend(str(tmp_path))
  optimizer = compare_configs.make_optimizer(specs.PRESETS["quick"])
  assert callable(optimizer.init)
