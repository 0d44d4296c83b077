"""Prepared rows as TFRecord files and the seqio task over them (hashmoe.data.prepared_tf), and the
t5x data choices built on them (hashmoe.t5x.data; t5x itself is not needed here).

References are independent of the code under test: the task's rows against the ArrayRecord shards
read by the grain loader's `RowReader`, arranged in tf.data's interleave order by a numpy loop; a
restored tf.data iterator (saved and restored as t5x does it: clu's `TfDatasetIterator` over
t5x's `seqio.get_dataset` call) against an uninterrupted pipeline; the streaming task's iterator
against the same save, which must fail; damaged, partial and stale copies against the error the
user must see; `hashmoe prepare --tfrecord` against the files it wrote.

Corpus: a generated text folder (tests/textdata.py), a 320-piece vocabulary, SEQ_LEN 32, tasks
registered under their own prefix (`ptf_text_lm`, `ptf_text_seq2seq`).
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import seqio
import tensorflow as tf
from clu.data import dataset_iterator as clu_iterator

from hashmoe import cli
from hashmoe.data import preparation, prepared, prepared_tf, tasks, vocab
from hashmoe.t5x import data as t5x_data
from hashmoe.training import errors
from textdata import write_text_folder

SEQ_LEN = 32
PREFIX = "ptf"
LM, SEQ2SEQ = f"{PREFIX}_text_lm", f"{PREFIX}_text_seq2seq"
SHARDS = {LM: 3, SEQ2SEQ: 2}
SPLITS = {LM: ("train",), SEQ2SEQ: ("train",)}
SHUFFLE_BUFFER = 64


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """The text folder, a private cache, the two tasks registered, each prepared once and copied."""
  base = tmp_path_factory.mktemp("prepared_tf")
  texts = write_text_folder(base / "texts", files=6, paragraphs=30)
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("HASHMOE_CACHE", str(base / "cache"))
    names = tasks.register_tasks(name_prefix=PREFIX, embedded=False, text_dir=str(texts),
                                 vocab_settings=vocab.SentencePieceSettings(vocab_size=320),
                                 shuffle_buffer_size=SHUFFLE_BUFFER)
    assert names == [LM, SEQ2SEQ]
    copies = {}
    for name in names:
      folder = prepared.prepared_dir(base / "root", name, SEQ_LEN)
      preparation.prepare(name, folder, seq_len=SEQ_LEN, splits=SPLITS[name],
                       num_shards=SHARDS[name], progress=False)
      copies[name] = prepared_tf.write_tfrecords(folder)
    yield {"base": base, "texts": texts, "root": base / "root", "copies": copies}


def folder_of(world, task):
  return prepared.prepared_dir(world["root"], task, SEQ_LEN)


def lengths(task):
  return {"targets": SEQ_LEN} if task.endswith("_lm") else {"inputs": SEQ_LEN, "targets": SEQ_LEN}


def task_rows(name, split, *, shard_info=None):
  """Every row of the registered task `name`, unshuffled, through its feature converter."""
  converter = prepared_tf.feature_converter_cls(name)(pack=True)
  dataset = seqio.get_dataset(name, lengths(name.split("_prepared")[0]), converter,
                              dataset_split=split, shuffle=False, num_epochs=1,
                              shard_info=shard_info, verbose=False)
  rows = list(dataset.as_numpy_iterator())
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def array_record_shards(folder, split):
  """The split's rows as the grain loader reads them (`RowReader`, manifest order), and the
  row indices of each shard."""
  manifest = prepared.read_manifest(folder)
  source = prepared.RowReader(manifest, split)
  rows = manifest.layout.decode(source.read(range(len(source))))
  ends = np.cumsum([s["rows"] for s in manifest.split(split)["shards"]])
  return rows, np.split(np.arange(ends[-1]), ends[:-1])


def interleaved(shards, block=16):
  """tf.data's `interleave` over files with a cycle at least as long as the file list (seqio's
  FileDataSource: cycle 16, block 16): `block` rows from each file in turn, a file that runs out
  leaving the cycle."""
  order, position = [], [0] * len(shards)
  while any(p < len(s) for p, s in zip(position, shards)):
    for i, shard in enumerate(shards):
      taken = shard[position[i]:position[i] + block]
      order.extend(taken)
      position[i] += len(taken)
  return np.asarray(order)


# --------------------------------------------------------------------------------------------------
# The task's rows.


@pytest.mark.parametrize("task", [LM, SEQ2SEQ])
def test_the_prepared_task_yields_the_array_record_rows_in_seqios_file_order(world, task):
  """Unshuffled, the task gives every row of the ArrayRecord shards exactly, array for array, in
  the order of seqio's file interleave; one data-parallel host of several (t5x's shard_info) reads
  exactly its files' rows; the token features carry the source task's vocabularies (what t5x
  compares with the model's)."""
  assert world["copies"][task].complete
  name = prepared_tf.register_prepared_task(task, seq_len=SEQ_LEN, root=world["root"])
  assert name == f"{task}_prepared_len{SEQ_LEN}"
  assert prepared_tf.source_task(name) == task and prepared_tf.source_task(task) == task
  for split in SPLITS[task]:
    want, shards = array_record_shards(folder_of(world, task), split)
    got = task_rows(name, split)
    order = interleaved(shards)
    assert sorted(got) == sorted(want) and len(order) == len(want["decoder_target_tokens"])
    for feature in want:
      assert got[feature].dtype == np.int32
      np.testing.assert_array_equal(got[feature], want[feature][order], err_msg=feature)
    host = task_rows(name, split, shard_info=seqio.ShardInfo(1, SHARDS[task]))
    for feature in want:
      np.testing.assert_array_equal(host[feature], want[feature][shards[1]], err_msg=feature)
  source = seqio.get_mixture_or_task(task).output_features
  features = seqio.get_mixture_or_task(name).output_features
  assert features["decoder_target_tokens"].vocabulary == source["targets"].vocabulary
  if task == SEQ2SEQ:
    assert features["encoder_input_tokens"].vocabulary == source["inputs"].vocabulary


def test_the_converters_pass_rows_through_and_refuse_other_shapes_lengths_or_unpacked(world):
  lm = prepared_tf.register_prepared_task(LM, seq_len=SEQ_LEN, root=world["root"])
  s2s = prepared_tf.register_prepared_task(SEQ2SEQ, seq_len=SEQ_LEN, root=world["root"])
  assert prepared_tf.feature_converter_cls(lm) is prepared_tf.PreparedDecoderFeatureConverter
  assert prepared_tf.feature_converter_cls(s2s) is prepared_tf.PreparedEncDecFeatureConverter
  # Streamed tasks keep seqio's training converters (what the t5x models defaulted to).
  assert prepared_tf.feature_converter_cls(LM) is seqio.DecoderFeatureConverter
  assert prepared_tf.feature_converter_cls(SEQ2SEQ) is seqio.EncDecFeatureConverter
  rows = seqio.get_mixture_or_task(lm).get_dataset({"targets": SEQ_LEN}, split="train",
                                                   shuffle=False)
  with pytest.raises(ValueError, match="prepared rows are packed"):
    prepared_tf.PreparedDecoderFeatureConverter(pack=False)
  with pytest.raises(ValueError, match=r"asks for int32\[64\].*prepared at another SEQ_LEN"):
    prepared_tf.PreparedDecoderFeatureConverter(pack=True)(rows, {"targets": 64})
  with pytest.raises(ValueError, match="prepared for another model shape"):
    prepared_tf.PreparedEncDecFeatureConverter(pack=True)(rows, lengths(SEQ2SEQ))


def test_a_record_that_is_not_one_row_of_the_layout_fails_naming_it(world):
  layout = prepared.read_manifest(folder_of(world, LM)).layout
  decode = prepared_tf.decode_fn(layout)
  good = prepared.RowReader(prepared.read_manifest(folder_of(world, LM)), "train").read([0])[0]
  got = decode(tf.constant([good, good]))
  for feature, want in layout.decode([good, good]).items():
    np.testing.assert_array_equal(got[feature], want)
  with pytest.raises(tf.errors.InvalidArgumentError, match="not one row of the prepared layout"):
    decode(tf.constant([good, good[:-2]]))


# --------------------------------------------------------------------------------------------------
# Checkpointing the iterator, as t5x does.


def t5x_train_iterator(task, *, seed=7, batch_size=4):
  """What t5x's train() iterates: `utils.get_dataset_inner`'s `seqio.get_dataset` call (the
  model's converter class built with the DatasetConfig's pack, endless epochs, one data-parallel
  shard), wrapped as `utils.prepare_train_iter` wraps it: clu's
  `TfDatasetIterator(checkpoint=True)`, whose save/restore t5x's checkpoints call."""
  converter = prepared_tf.feature_converter_cls(task)(pack=True, use_custom_packing_ops=False)
  dataset = seqio.get_dataset(
      mixture_or_task_name=task, task_feature_lengths={"targets": SEQ_LEN},
      dataset_split="train", shuffle=True, num_epochs=None, feature_converter=converter,
      shard_info=seqio.ShardInfo(index=0, num_shards=1), use_cached=False, seed=seed,
      trim_output_features=True, batch_size=batch_size, verbose=False)
  return clu_iterator.TfDatasetIterator(dataset, checkpoint=True)


def assert_batches_equal(got, want):
  assert len(got) == len(want)
  for step, (a, b) in enumerate(zip(got, want)):
    assert sorted(a) == sorted(b)
    for feature in b:
      np.testing.assert_array_equal(a[feature], b[feature], err_msg=f"batch {step} {feature}")


def test_a_restored_iterator_reads_the_batches_of_an_uninterrupted_run(world, tmp_path):
  """t5x's dataset checkpoint on the prepared task: a pipeline stopped after N batches (past an
  epoch's end, with rows in the shuffle buffer) and restored in a fresh pipeline gives batches
  N..N+k of an uninterrupted pipeline, which a fresh unrestored one does not. The streaming task's
  iterator (a Python generator) cannot be saved at all: why the prepared task exists."""
  name = prepared_tf.register_prepared_task(LM, seq_len=SEQ_LEN, root=world["root"])
  rows = prepared.read_manifest(folder_of(world, LM)).rows("train")
  stop, more = rows // 4 + 20, 12  # 4 rows per batch: past the first epoch
  uninterrupted = t5x_train_iterator(name)
  reference = [next(uninterrupted) for _ in range(stop + more)][stop:]

  killed = t5x_train_iterator(name)
  for _ in range(stop):
    next(killed)
  killed.save(tmp_path / "train_ds")
  restarted = t5x_train_iterator(name)
  restarted.restore(tmp_path / "train_ds")
  assert_batches_equal([next(restarted) for _ in range(more)], reference)
  fresh = [next(t5x_train_iterator(name)) for _ in range(1)]
  assert any(not np.array_equal(fresh[0][k], reference[0][k]) for k in reference[0])

  streaming = clu_iterator.TfDatasetIterator(seqio.get_dataset(
      LM, {"targets": SEQ_LEN}, seqio.DecoderFeatureConverter(pack=True), dataset_split="train",
      shuffle=True, num_epochs=None, seed=7, batch_size=4, verbose=False), checkpoint=True)
  next(streaming)
  with pytest.raises(tf.errors.FailedPreconditionError, match="PyFunc is stateful"):
    streaming.save(tmp_path / "streaming_ds")


# --------------------------------------------------------------------------------------------------
# Partial, damaged and stale copies.


def copy_of(world, tmp_path, task=LM):
  """A copy of `task`'s prepared folder at the path its root names."""
  root = tmp_path / "root"
  shutil.copytree(folder_of(world, task), prepared.prepared_dir(root, task, SEQ_LEN))
  return root, prepared.prepared_dir(root, task, SEQ_LEN)


def test_an_unfinished_or_damaged_copy_is_refused_and_copying_again_repairs_it(world, tmp_path):
  root, folder = copy_of(world, tmp_path)
  register = lambda: prepared_tf.register_prepared_task(LM, seq_len=SEQ_LEN, root=root)
  fix = r"run `hashmoe prepare --tfrecord` with this run's gin files"
  (folder / "tfrecord.json").unlink()
  (folder / "train" / "rows-00001-of-00003.tfrecord.done.json").unlink()
  with pytest.raises(errors.PreparedDataError, match=rf"no complete TFRecord copy .*unfinished: "
                     rf"2 of 3 shards copied\): {fix}"):
    register()
  result = prepared_tf.write_tfrecords(folder)
  assert result.complete and result.copied == [("train", 1)] and len(result.kept) == 2
  assert register() == f"{LM}_prepared_len{SEQ_LEN}"

  shard = folder / "train" / "rows-00002-of-00003.tfrecord"
  data = shard.read_bytes()
  shard.write_bytes(data[:-7])
  with pytest.raises(errors.PreparedDataError, match=rf"has {len(data) - 7} bytes, tfrecord.json "
                     rf"says {len(data)} \(truncated or replaced\): {fix}"):
    register()
  shard.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
  with pytest.raises(errors.PreparedDataError, match=r"does not match the sha256 .*\(damaged\)"):
    register()
  result = prepared_tf.write_tfrecords(folder)
  assert result.complete and result.redone == [("train", 2)] and shard.read_bytes() == data
  register()

  with pytest.raises(errors.PreparedDataError, match=r"nothing prepared there.*hashmoe prepare "
                     r"--tfrecord.*DATA_SOURCE='streaming'"):
    prepared_tf.register_prepared_task(LM, seq_len=2 * SEQ_LEN, root=root)
  (folder / "manifest.json").unlink()
  with pytest.raises(errors.PreparedDataError, match="no manifest.json.*run `hashmoe prepare`"):
    prepared_tf.write_tfrecords(folder)


def test_copies_of_an_earlier_prepare_are_stale_refused_and_recopied(world, tmp_path):
  """The corpus changed and its folder was prepared again: the TFRecord copies still hold the old
  rows. They are refused until copied again, which redoes exactly the changed shard; the task
  then reads the new rows."""
  texts = shutil.copytree(world["texts"], tmp_path / "texts")
  vocabulary = seqio.get_mixture_or_task(LM).output_features["targets"].vocabulary
  (task, _) = tasks.register_tasks(name_prefix="ptfstale", embedded=False, text_dir=str(texts),
                                   vocabulary=vocabulary)
  root = tmp_path / "root"
  folder = prepared.prepared_dir(root, task, SEQ_LEN)
  preparation.prepare(task, folder, seq_len=SEQ_LEN, splits=("train",), num_shards=1,
                   progress=False)
  prepared_tf.write_tfrecords(folder)
  name = prepared_tf.register_prepared_task(task, seq_len=SEQ_LEN, root=root)
  before = task_rows(name, "train")
  old = prepared_tf.prepared_task_info(name)

  train_file = sorted(texts.glob("*.txt"))[0]
  train_file.write_text(train_file.read_text() + "\n\nA new paragraph of the changed corpus.\n")
  for stale in ("manifest.json", "train/rows-00000-of-00001.arrayrecord",
                "train/rows-00000-of-00001.arrayrecord.done.json"):
    (folder / stale).unlink()
  preparation.prepare(task, folder, seq_len=SEQ_LEN, splits=("train",), num_shards=1,
                   progress=False)
  with pytest.raises(errors.PreparedMismatchError, match=r"made from an earlier prepare of this "
                     r"folder .*hold other rows than the ArrayRecord shards"):
    prepared_tf.register_prepared_task(task, seq_len=SEQ_LEN, root=root)
  result = prepared_tf.write_tfrecords(folder)
  assert result.complete and result.redone == [("train", 0)] and not result.kept
  assert prepared_tf.register_prepared_task(task, seq_len=SEQ_LEN, root=root) == name
  after = task_rows(name, "train")
  want, _ = array_record_shards(folder, "train")
  assert len(after["decoder_target_tokens"]) != len(before["decoder_target_tokens"]) or any(
      not np.array_equal(after[k], before[k]) for k in before)
  for feature in want:
    np.testing.assert_array_equal(after[feature], want[feature], err_msg=feature)
  assert prepared_tf.prepared_task_info(name).manifest != old.manifest


# --------------------------------------------------------------------------------------------------
# What a t5x run's gin calls (hashmoe.t5x.data), without t5x.


def test_a_t5x_run_reads_the_chosen_source_and_its_model_dir_keeps_it(world, tmp_path):
  model_dir = tmp_path / "run"
  choose = lambda source, **kw: t5x_data.training_task(
      LM, data_source=source, seq_len=SEQ_LEN, prepared_dir=world["root"],
      model_dir=str(model_dir), **kw)
  assert choose("streaming") == LM
  assert not t5x_data.dataset_checkpointable(LM)
  assert t5x_data.feature_converter_cls(LM) is seqio.DecoderFeatureConverter
  name = choose("prepared")  # No checkpoint yet: the run may still change its data.
  assert name == f"{LM}_prepared_len{SEQ_LEN}" and t5x_data.dataset_checkpointable(name)
  assert t5x_data.feature_converter_cls(name) is prepared_tf.PreparedDecoderFeatureConverter
  assert t5x_data.task_vocabulary(name) == t5x_data.task_vocabulary(LM)
  record = json.loads((model_dir / t5x_data.DATA_FILE).read_text())
  assert record["data_source"] == "prepared" and record["task"] == name
  with pytest.raises(ValueError, match="DATA_SOURCE='auto'.*choose 'prepared'"):
    choose("auto")

  (model_dir / "checkpoint_4").mkdir()
  assert choose("prepared") == name
  with pytest.raises(errors.PreparedMismatchError, match=r"trained on other data than this run "
                     r"reads \(data_source: 'prepared' in MODEL_DIR, 'streaming' now;.*start a new "
                     r"MODEL_DIR"):
    choose("streaming")
  (model_dir / t5x_data.DATA_FILE).unlink()  # Checkpoints from before the record: streaming.
  with pytest.raises(errors.PreparedMismatchError, match="'streaming' in MODEL_DIR, 'prepared'"):
    choose("prepared")
  assert choose("streaming") == LM
  assert json.loads((model_dir / t5x_data.DATA_FILE).read_text()) == {
      "data_source": "streaming", "task": LM}


# --------------------------------------------------------------------------------------------------
# The command.


@pytest.fixture
def fresh_text_tasks():
  """text_dir.gin's task names unregistered before and after (seqio's registry is global)."""

  def remove():
    for name in list(seqio.TaskRegistry.names()):
      if name.startswith("hashmoe_text_"):
        seqio.TaskRegistry.remove(name)

  remove()
  yield
  remove()


@pytest.mark.usefixtures("fresh_text_tasks")
def test_prepare_tfrecord_command_copies_verifies_and_names_a_damaged_copy(world, tmp_path,
                                                                         capsys, monkeypatch):
  monkeypatch.setenv("HASHMOE_CACHE", str(world["base"] / "cache"))
  root = tmp_path / "root"
  base = ["prepare", "--gin_file=configs/runs/cpu_tiny.gin",
          "--gin_file=configs/tasks/text_dir.gin", f"--gin.TEXT_DIR='{world['texts']}'",
          "--gin.VOCAB_SIZE=320", f"--gin.SEQ_LEN={SEQ_LEN}", f"--gin.PREPARED_DIR='{root}'",
          "--num_shards=1", "--splits=train", "--workers=1", "--no_progress", "--tfrecord",
          "--compilation_cache_dir=none"]

  def run(*extra):
    capsys.readouterr()
    code = cli.main(base + list(extra))
    out, err = capsys.readouterr()
    return code, (json.loads(out.strip().splitlines()[-1]) if code == 0 else err)

  code, summary = run()
  folder = prepared.prepared_dir(root, "hashmoe_text_lm", SEQ_LEN)
  assert code == 0 and summary["complete"]
  assert summary["tfrecord"] == {"complete": True, "copied": 1, "kept": 0, "redone": 0,
                                 "missing": 0, "seconds": summary["tfrecord"]["seconds"],
                                 "task": f"hashmoe_text_lm_prepared_len{SEQ_LEN}"}
  assert (folder / "train" / "rows-00000-of-00001.tfrecord").is_file()
  code, summary = run()
  assert code == 0 and (summary["kept"], summary["tfrecord"]["kept"]) == (1, 1)
  code, summary = run("--verify")
  side = json.loads((folder / "tfrecord.json").read_text())
  assert code == 0 and summary["verified"] and summary["tfrecord"] == side["fingerprint"]
  shard = folder / "train" / "rows-00000-of-00001.tfrecord"
  data = shard.read_bytes()
  shard.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
  code, err = run("--verify")
  assert code == 1 and f"TFRecord copy {shard} does not match the sha256" in err
