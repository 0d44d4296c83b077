"""Prepared data (`hashmoe prepare`, hashmoe.data.prepared) and its grain loader
(hashmoe.data.loader).

References are independent of the code under test: the rows of every shard against the streaming
pipeline's own batches (`tasks.get_batches`, unshuffled, the same example shard); the loader's
batches against a numpy arrangement of the rows by the epochs' permutations; a resumed loader
against an uninterrupted one; key counts against the streaming counter (`stats.count_tokens`);
a restarted prepare against an uninterrupted prepare (identical sha256s); a SIGKILLed
`hashmoe train` on prepared data against its uninterrupted twin (bit-equal losses).

Corpus: a generated text folder (tests/textdata.py), a 320-piece vocabulary, SEQ_LEN 32, tasks
registered under their own prefix (`prep_text_lm`, `prep_text_seq2seq`) so no other test file's
tasks clash with them.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from hashmoe import cli
from hashmoe.data import loader, pipeline, preparation, prepared, stats, tasks, vocab
from hashmoe.training import checkpoints, errors
from textdata import write_text_folder

REPO = Path(__file__).resolve().parent.parent
SEQ_LEN = 32
NUM_SHARDS = 3
PREFIX = "prep"
LM, SEQ2SEQ = f"{PREFIX}_text_lm", f"{PREFIX}_text_seq2seq"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """The text folder, a private cache, the two tasks registered, and each prepared once."""
  base = tmp_path_factory.mktemp("prepared")
  texts = write_text_folder(base / "texts", files=6, paragraphs=30)
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("HASHMOE_CACHE", str(base / "cache"))
    names = tasks.register_tasks(name_prefix=PREFIX, embedded=False, text_dir=str(texts),
                                 vocab_settings=vocab.SentencePieceSettings(vocab_size=320))
    assert names == [LM, SEQ2SEQ]
    results = {name: preparation.prepare(name, base / "ref" / name, seq_len=SEQ_LEN,
                                      num_shards=NUM_SHARDS, progress=False) for name in names}
    yield {"base": base, "texts": texts, "results": results}


def ref_dir(world, task):
  return world["base"] / "ref" / task


def manifest_of(world, task):
  return prepared.open_prepared(ref_dir(world, task), task=task, shape=task.rsplit("_", 1)[1],
                                vocab_fingerprint=fingerprint(task), seq_len=SEQ_LEN,
                                splits=("train", "validation", "test"))


def fingerprint(task):
  import seqio
  return vocab.vocab_fingerprint(seqio.get_mixture_or_task(task).output_features[
      "targets"].vocabulary)


def streamed_rows(task, split, **shard):
  """The streaming pipeline's rows of `split` in order, unshuffled (all-zero padding rows of its
  last batch dropped): the reference for what a shard holds."""
  iterator = tasks.get_batches(task, split, batch_size=16, seq_len=SEQ_LEN, shuffle=False,
                               repeat=False, drop_remainder=False, **shard)
  with iterator:
    batches = list(iterator)
  rows = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
  real = rows["decoder_segment_ids"].any(axis=1)
  return {k: v[real] for k, v in rows.items()}


def shard_rows(manifest, split, index):
  """The rows of one shard file, decoded."""
  path = manifest.local_directory / prepared.shard_file(split, index, NUM_SHARDS)
  reader = prepared.array_record_module.ArrayRecordReader(str(path), "readahead_buffer_size:0")
  try:
    return manifest.layout.decode(reader.read(list(range(reader.num_records()))))
  finally:
    reader.close()


def all_rows(manifest, split):
  source = prepared.RowReader(manifest, split)
  return manifest.layout.decode(source.read(range(len(source))))


def pieces(rows):
  """Every packed segment's targets, as bytes (a multiset of the examples in the rows)."""
  out = []
  for targets, segments in zip(rows["decoder_target_tokens"], rows["decoder_segment_ids"]):
    out += [targets[segments == s].tobytes() for s in np.unique(segments[segments > 0])]
  return sorted(out)


# --------------------------------------------------------------------------------------------------
# What prepare writes.


@pytest.mark.parametrize("task", [LM, SEQ2SEQ])
def test_every_shard_holds_the_streaming_pipelines_rows_of_its_examples(world, task):
  """Shard k's rows are, array for array, the rows the streaming pipeline gives for the examples
  with index % N == k (unshuffled, packed by the training converter); together the shards hold
  every example of the split exactly once; the manifest counts them."""
  manifest = manifest_of(world, task)
  for split in ("train", "validation", "test"):
    info = manifest.split(split)
    assert [s["file"] for s in info["shards"]] == [
        prepared.shard_file(split, k, NUM_SHARDS) for k in range(NUM_SHARDS)]
    for k in range(NUM_SHARDS):
      got, want = shard_rows(manifest, split, k), streamed_rows(task, split, shard_index=k,
                                                               num_shards=NUM_SHARDS)
      assert sorted(got) == sorted(want)
      for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=f"{split} shard {k} {name}")
        assert got[name].dtype == np.int32
      assert info["shards"][k]["rows"] == len(want["decoder_target_tokens"])
      assert info["shards"][k]["tokens"] == np.count_nonzero(want["decoder_target_tokens"])
    whole = streamed_rows(task, split)
    assert pieces(all_rows(manifest, split)) == pieces(whole)  # disjoint and complete
    assert info["rows"] == sum(s["rows"] for s in info["shards"]) > 0
    assert info["tokens"] == np.count_nonzero(whole["decoder_target_tokens"])
    if task == SEQ2SEQ:
      assert info["input_tokens"] == np.count_nonzero(whole["encoder_input_tokens"])
  data = manifest.data
  assert (data["task"], data["shape"], data["feature_lengths"], data["num_shards"]) == (
      task, task.rsplit("_", 1)[1], ({"targets": SEQ_LEN} if task == LM else
                                     {"inputs": SEQ_LEN, "targets": SEQ_LEN}), NUM_SHARDS)
  assert data["converter"] == {"name": "DecoderFeatureConverter" if task == LM else
                               "EncDecFeatureConverter", "pack": True}
  assert data["vocabulary"] == {"fingerprint": fingerprint(task), "size": 320}


def test_record_layout_round_trips_and_refuses_values_that_do_not_fit():
  layout = prepared.RecordLayout.for_features(
      {"decoder_target_tokens": 5, "decoder_loss_weights": 5, "decoder_positions": 5}, 320)
  assert layout.features == (("decoder_loss_weights", "uint8", 5),
                             ("decoder_positions", "uint16", 5),
                             ("decoder_target_tokens", "uint16", 5))
  assert layout.dtype.itemsize == 5 + 10 + 10
  rng = np.random.default_rng(0)
  rows = {"decoder_target_tokens": rng.integers(0, 320, (7, 5)),
          "decoder_loss_weights": rng.integers(0, 2, (7, 5)),
          "decoder_positions": rng.integers(0, 5, (7, 5))}
  records = layout.encode(rows)
  assert len(records) == 7 and {len(r) for r in records} == {25}
  decoded = layout.decode(records[2:5])
  for name, values in rows.items():
    np.testing.assert_array_equal(decoded[name], values[2:5])
  big = prepared.RecordLayout.for_features({"decoder_target_tokens": 5}, 70_000)
  assert big.features == (("decoder_target_tokens", "int32", 5),)
  with pytest.raises(ValueError, match=r"feature 'decoder_target_tokens': value 70000 does not "
                     r"fit the stored dtype uint16"):
    layout.encode({**rows, "decoder_target_tokens": np.full((7, 5), 70_000)})
  with pytest.raises(errors.PreparedDataError, match="a record of 3 bytes where the layout's "
                     "rows are 25"):
    layout.decode([records[0], b"abc"])


# --------------------------------------------------------------------------------------------------
# Faults while preparing: killed, damaged, disk full, another plan.


def cli_prepare(texts, *extra):
  return [sys.executable, "-m", "hashmoe.cli", "prepare",
          "--gin_file=configs/runs/cpu_tiny.gin", "--gin_file=configs/tasks/text_dir.gin",
          f"--gin.TEXT_DIR='{texts}'", "--gin.VOCAB_SIZE=320", f"--gin.SEQ_LEN={SEQ_LEN}",
          f"--num_shards={NUM_SHARDS}", "--no_progress", *extra]


def test_a_prepare_killed_mid_shard_resumes_keeping_finished_shards(world, tmp_path):
  """A real `hashmoe prepare` (two worker processes) SIGKILLed once its first shard is done; the
  next prepare verifies the finished shards (sha256), removes the partial one and prepares the
  rest. The result is byte for byte the uninterrupted prepare's (the same manifest fingerprint)."""
  cache = tmp_path / "cache"
  env = dict(os.environ, HASHMOE_CACHE=str(cache), JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
             PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in os.environ.get(
                 "PYTHONPATH", "").split(os.pathsep) if p]))
  # The default task name of text_dir.gin: its folder under this cache's prepared root.
  folder = cache / "prepared" / "hashmoe_text_lm" / f"len{SEQ_LEN}"
  proc = subprocess.Popen(cli_prepare(world["texts"], "--workers=2"), cwd=REPO, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 300
    while not list(folder.glob(f"*/*{prepared.DONE_SUFFIX}")):
      assert proc.poll() is None, proc.stderr.read()[-3000:]
      assert time.time() < deadline, "no shard finished in 300 s"
      time.sleep(0.05)
    proc.kill()
  finally:
    proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL
  done_before = sorted(p.name for p in folder.glob(f"*/*{prepared.DONE_SUFFIX}"))
  assert not (folder / prepared.MANIFEST_FILE).exists()
  # A crash can leave a temporary file of the shard that was being written: make sure one is
  # there, as a kill mid-shard leaves it.
  (folder / "validation").mkdir(exist_ok=True)
  leftover = folder / "validation" / ".rows-00002-of-00003.arrayrecord.tmp-host-1-dead"
  leftover.write_bytes(b"partial")

  done = subprocess.run(cli_prepare(world["texts"], "--workers=1"), cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  summary = json.loads(done.stdout.strip().splitlines()[-1])
  assert summary["complete"] and summary["kept"] == len(done_before) >= 1
  assert summary["kept"] + summary["prepared"] == 3 * NUM_SHARDS
  assert f"{len(done_before)} finished shard(s) verified (sha256) and kept" in done.stderr
  assert not list(folder.glob(f"*/.*{prepared.TMP_MARK}*"))  # pylint: disable=protected-access
  # The same rows as the uninterrupted prepare of the same texts and vocabulary settings.
  manifest = preparation.verify(folder)
  uninterrupted = json.loads((ref_dir(world, LM) / prepared.MANIFEST_FILE).read_text())
  assert [s["sha256"] for split in ("train", "validation", "test")
          for s in manifest.data["split_info"][split]["shards"]] == [
              s["sha256"] for split in ("train", "validation", "test")
              for s in uninterrupted["split_info"][split]["shards"]]


def test_a_damaged_finished_shard_is_redone_not_trusted(world, tmp_path, caplog):
  folder = tmp_path / "copy"
  shutil.copytree(ref_dir(world, LM), folder)
  (folder / prepared.MANIFEST_FILE).unlink()
  shard = folder / prepared.shard_file("train", 1, NUM_SHARDS)
  data = bytearray(shard.read_bytes())
  data[len(data) // 3] ^= 0xFF
  shard.write_bytes(bytes(data))
  with caplog.at_level(logging.WARNING, logger="hashmoe.data.prepared"):
    result = preparation.prepare(LM, folder, seq_len=SEQ_LEN, num_shards=NUM_SHARDS, progress=False)
  assert result.redone == result.prepared == [("train", 1)]
  assert len(result.kept) == 3 * NUM_SHARDS - 1
  assert "shard 1 of train is damaged or unfinished (its file's sha256 differs from its done " \
         "record's); preparing it again" in caplog.text
  assert result.manifest["fingerprint"] == world["results"][LM].manifest["fingerprint"]


_WRITER = prepared.array_record_module.ArrayRecordWriter


class _FullDisk:
  """An ArrayRecordWriter whose third file fails at close as array_record reports a full disk."""
  opened = 0

  def __init__(self, path, options):
    type(self).opened += 1
    self._fail = type(self).opened == 3
    self._writer = _WRITER(path, options)
    self._path = path

  def write(self, record):
    self._writer.write(record)

  def close(self):
    self._writer.close()
    if self._fail:
      raise RuntimeError(f"write() failed: No space left on device; writing {self._path}; at "
                         "byte 4096")


def test_a_full_disk_names_the_shard_keeps_the_finished_ones_and_a_rerun_completes(
    world, tmp_path, monkeypatch):
  folder = tmp_path / "full"
  monkeypatch.setattr(prepared.array_record_module, "ArrayRecordWriter", _FullDisk)
  with pytest.raises(OSError) as raised:
    preparation.prepare(LM, folder, seq_len=SEQ_LEN, num_shards=NUM_SHARDS, progress=False)
  third = folder / prepared.shard_file("train", 2, NUM_SHARDS)
  assert raised.value.errno == 28 and raised.value.filename == str(third)
  code, message = cli._describe(raised.value, "prepare", folder)  # pylint: disable=protected-access
  assert code == 1 and message == (
      f"no space left on device while writing {third}; free some space (or point PREPARED_DIR "
      "elsewhere) and run the same command again: the finished shards are kept")
  assert sorted(p.name for p in folder.rglob("*") if p.is_file()) == sorted(
      [prepared.PLAN_FILE] + [f"rows-0000{k}-of-00003.arrayrecord{suffix}" for k in (0, 1)
                              for suffix in ("", prepared.DONE_SUFFIX)])
  monkeypatch.undo()
  result = preparation.prepare(LM, folder, seq_len=SEQ_LEN, num_shards=NUM_SHARDS, progress=False)
  assert [s for s in result.kept] == [("train", 0), ("train", 1)]
  assert result.manifest["fingerprint"] == world["results"][LM].manifest["fingerprint"]


def test_hosts_prepare_disjoint_shards_and_the_last_writes_the_manifest(world, tmp_path):
  folder = tmp_path / "hosts"
  first = preparation.prepare(LM, folder, seq_len=SEQ_LEN, num_shards=NUM_SHARDS,
                           shard_indices=[0, 2], progress=False)
  assert first.manifest is None and first.missing == [("train", 1), ("validation", 1),
                                                      ("test", 1)]
  assert not (folder / prepared.MANIFEST_FILE).exists()
  assert preparation.status(folder) == {"state": "partial", "done": 6, "total": 9}
  with pytest.raises(errors.PreparedDataError, match=r"3 shard\(s\) unusable \(train/rows-00001-"
                     r"of-00003.arrayrecord: missing; validation/rows-00001-of-00003.arrayrecord: "
                     r"missing; test/rows-00001-of-00003.arrayrecord: missing\)"):
    preparation.verify(folder)
  second = preparation.prepare(LM, folder, seq_len=SEQ_LEN, num_shards=NUM_SHARDS,
                            shard_indices=[1], progress=False)
  assert second.kept == [] and second.prepared == [("train", 1), ("validation", 1), ("test", 1)]
  assert second.manifest["fingerprint"] == world["results"][LM].manifest["fingerprint"]


@pytest.mark.parametrize("change, message", [
    ({"num_shards": 4}, r'num_shards: 3 there, 4 here'),
    ({"seq_len": 64}, r'feature_lengths: \{"targets": 32\} there, \{"targets": 64\} here'),
    ({"splits": ("train",)},
     r'splits: \["train", "validation", "test"\] there, \["train"\] here'),
])
def test_preparing_into_a_folder_begun_for_another_plan_is_refused(world, tmp_path, change,
                                                                   message):
  folder = tmp_path / "plan"
  preparation.prepare(LM, folder, seq_len=SEQ_LEN, num_shards=NUM_SHARDS, shard_indices=[0],
                   progress=False)
  before = sorted(p.name for p in folder.rglob("*"))
  arguments = {"seq_len": SEQ_LEN, "num_shards": NUM_SHARDS, **change}
  with pytest.raises(errors.PreparedMismatchError, match=message):
    preparation.prepare(LM, folder, progress=False, **arguments)
  assert sorted(p.name for p in folder.rglob("*")) == before
  with pytest.raises(errors.PreparedMismatchError, match="task:"):
    preparation.prepare(SEQ2SEQ, folder, seq_len=SEQ_LEN, num_shards=NUM_SHARDS, progress=False)


# --------------------------------------------------------------------------------------------------
# Faults while reading: damaged shards, a manifest of another run.


@pytest.mark.parametrize("damage, message", [
    ("truncate", r"has \d+ bytes, its manifest says \d+ \(truncated or replaced\)"),
    ("flip", r"does not match its manifest's sha256 \(damaged\)"),
    ("delete", r"is missing"),
])
def test_a_missing_truncated_or_corrupt_shard_is_a_clear_error_on_opening(world, tmp_path, damage,
                                                                           message):
  folder = tmp_path / "damaged"
  shutil.copytree(ref_dir(world, LM), folder)
  shard = folder / prepared.shard_file("train", 2, NUM_SHARDS)
  data = shard.read_bytes()
  if damage == "truncate":
    shard.write_bytes(data[:len(data) // 2])
  elif damage == "flip":
    shard.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
  else:
    shard.unlink()
  with pytest.raises(errors.PreparedDataError, match=f"prepared shard {shard} {message}; run "
                     r"`hashmoe prepare` again with the same settings \(it redoes damaged "
                     r"shards\), or `hashmoe prepare --verify` to check every shard"):
    prepared.open_prepared(folder, task=LM, shape="lm", vocab_fingerprint=fingerprint(LM),
                           seq_len=SEQ_LEN)
  with pytest.raises(errors.PreparedDataError, match=r"1 shard\(s\) unusable"):
    preparation.verify(folder)
  # Truncated so that the size still matches (the record index is cut): riegeli refuses it.
  if damage == "truncate":
    manifest = json.loads((folder / prepared.MANIFEST_FILE).read_text())
    manifest["split_info"]["train"]["shards"][2]["bytes"] = len(data) // 2
    (folder / prepared.MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(errors.PreparedDataError, match=f"prepared shard {shard} is not readable"):
      prepared.open_prepared(folder, task=LM, shape="lm", vocab_fingerprint=fingerprint(LM),
                             seq_len=SEQ_LEN)


def test_a_manifest_of_another_task_vocabulary_or_length_is_refused_naming_each(world):
  with pytest.raises(errors.PreparedMismatchError) as raised:
    prepared.open_prepared(ref_dir(world, LM), task=SEQ2SEQ, shape="seq2seq",
                           vocab_fingerprint="0" * 16, seq_len=64)
  message = str(raised.value)
  assert message.startswith(f"the prepared data in {ref_dir(world, LM)} was made for another "
                            "run: ")
  for part in (f'task: "{LM}" there, "{SEQ2SEQ}" here',
               f'vocabulary fingerprint: "{fingerprint(LM)}" there, "0000000000000000" here',
               'feature_lengths: {"targets": 32} there, {"inputs": 64, "targets": 64} here',
               'converter: {"name": "DecoderFeatureConverter", "pack": true} there, '
               '{"name": "EncDecFeatureConverter", "pack": true} here'):
    assert part in message
  assert message.endswith("or stream it (--gin.DATA_SOURCE=\"'streaming'\").")
  assert isinstance(raised.value, errors.ConfigError)  # the CLI's exit 2


# --------------------------------------------------------------------------------------------------
# The loader.


def reference_stream(world, task, seed, rows_needed):
  """Stream row indices of the epochs as numpy arranges them: epoch e is the permutation of
  grain's index shuffle seeded seed + e (checked to be a permutation), epochs one after another."""
  from grain.experimental import index_shuffle
  total = manifest_of(world, task).rows("train")
  epochs = []
  for e in range(-(-rows_needed // total)):
    perm = np.array([index_shuffle(i, max_index=total - 1, seed=seed + e, rounds=4)
                     for i in range(total)])
    np.testing.assert_array_equal(np.sort(perm), np.arange(total))
    epochs.append(perm)
  return np.concatenate(epochs)[:rows_needed]


@pytest.mark.parametrize("process_count", [1, 2, 4])
def test_training_batches_are_the_shuffled_epochs_in_order_each_process_its_slice(world,
                                                                                    process_count):
  task, seed, batch_size = LM, 7, 8
  manifest = manifest_of(world, task)
  total = manifest.rows("train")
  steps = 2 * total // batch_size + 3  # past two epochs, batches spanning epoch ends included
  stream = reference_stream(world, task, seed, steps * batch_size)
  rows = all_rows(manifest, "train")
  iterators = [loader.batches(manifest, batch_size=batch_size, seed=seed, process_index=p,
                              process_count=process_count) for p in range(process_count)]
  for b in range(steps):
    wanted = stream[b * batch_size:(b + 1) * batch_size]
    got = [next(it) for it in iterators]
    for name in rows:
      np.testing.assert_array_equal(np.concatenate([g[name] for g in got]), rows[name][wanted],
                                    err_msg=f"batch {b} {name}")
  assert {it.position()["next_batch"] for it in iterators} == {steps}
  assert len({json.dumps(it.position()) for it in iterators}) == 1  # the same on every process
  # Another seed, another order; two epochs differ.
  assert not np.array_equal(stream[:total], reference_stream(world, task, seed + 1, total))
  assert not np.array_equal(stream[:total], stream[total:2 * total])


def test_resuming_at_any_batch_gives_the_uninterrupted_batches(world):
  manifest = manifest_of(world, LM)
  whole = loader.batches(manifest, batch_size=8, seed=3)
  expected = [next(whole) for _ in range(90)]
  data = loader.PreparedPipeline(LM, batch_size=8, seq_len=SEQ_LEN, seed=3, manifest=manifest)
  for start in (0, 1, 41, 89):
    first = data.train_batches(None)
    for _ in range(start):
      next(first)
    position = json.loads(json.dumps(first.position()))  # as a checkpoint holds it
    first.close()
    resumed = data.train_batches(position)
    for b in range(start, min(start + 3, 90)):
      got = next(resumed)
      for name in got:
        np.testing.assert_array_equal(got[name], expected[b][name])
    resumed.close()


def test_a_loader_position_of_other_data_seed_batch_size_or_the_streaming_pipeline_is_refused(
    world):
  manifest = manifest_of(world, LM)
  data = loader.PreparedPipeline(LM, batch_size=8, seq_len=SEQ_LEN, seed=3, manifest=manifest)
  position = data.train_batches(None).position()
  for change, text in ((("seed", 4), "seed: 4 in the checkpoint, 3 now"),
                       (("batch_size", 16), "batch_size: 16 in the checkpoint, 8 now"),
                       (("dataset", "f" * 64),
                        f"dataset: '{'f' * 64}' in the checkpoint, '{manifest.fingerprint}' now")):
    with pytest.raises(errors.PreparedMismatchError) as raised:
      data.train_batches({**position, change[0]: change[1]})
    assert text in str(raised.value)
    assert "resuming would not continue the same batch sequence" in str(raised.value)
  streaming = {"format": "hashmoe.BatchIteratorState/1", "arguments": {}, "next_batch": 5}
  with pytest.raises(errors.PreparedMismatchError, match=r"written by the streaming pipeline .* "
                     r"Continue streaming with --gin.DATA_SOURCE=\"'streaming'\", or start a new "
                     r"MODEL_DIR"):
    data.train_batches(streaming)


def test_eval_batches_are_the_splits_rows_in_order_padded_and_split_over_processes(world):
  manifest = manifest_of(world, LM)
  rows = all_rows(manifest, "validation")
  total = len(rows["decoder_target_tokens"])
  batch_size = 16
  count = -(-total // batch_size)
  one = loader.eval_batches(manifest, "validation", batch_size=batch_size, num_batches=100)
  assert len(one) == count
  flat = {k: np.concatenate([b[k] for b in one]) for k in rows}
  for name, values in rows.items():
    np.testing.assert_array_equal(flat[name][:total], values)
    assert not flat[name][total:].any()  # padding rows: all zero
  two = [loader.eval_batches(manifest, "validation", batch_size=batch_size, num_batches=100,
                             process_index=p, process_count=2) for p in range(2)]
  for b in range(count):
    for name in rows:
      np.testing.assert_array_equal(np.concatenate([two[0][b][name], two[1][b][name]]),
                                    one[b][name])
  assert len(loader.eval_batches(manifest, "validation", batch_size=batch_size,
                                 num_batches=2)) == 2


@pytest.mark.parametrize("task", [LM, SEQ2SEQ])
def test_key_counts_from_prepared_rows_equal_the_streaming_counts(world, task):
  data = loader.PreparedPipeline(task, batch_size=8, seq_len=SEQ_LEN, seed=0,
                                 manifest=manifest_of(world, task))
  for key, key_space in (("token", 320), ("prev_token", 320), ("bigram", 97)):
    for decoder_inputs in (True, False):
      streamed = stats.count_tokens(task, key=key, key_space=key_space, sequence_length=SEQ_LEN,
                                    decoder_inputs=decoder_inputs, use_cache=False).counts
      np.testing.assert_array_equal(
          data.key_counts(key, key_space, decoder_inputs=decoder_inputs), streamed,
          err_msg=f"{key} decoder_inputs={decoder_inputs}")


# --------------------------------------------------------------------------------------------------
# Which data a run reads.


def test_a_run_reads_prepared_data_where_it_exists_and_streams_otherwise(world, tmp_path, caplog):
  root = world["base"] / "ref"
  flat_root = tmp_path / "root"
  (flat_root / LM).mkdir(parents=True)
  shutil.copytree(root / LM, flat_root / LM / f"len{SEQ_LEN}")
  make = lambda **kw: loader.make_input_pipeline(LM, batch_size=8, seq_len=SEQ_LEN, seed=0, **kw)
  with caplog.at_level(logging.INFO, logger="hashmoe.data.loader"):
    data = make(prepared_dir=str(flat_root))
  assert isinstance(data, loader.PreparedPipeline)
  assert f"data: prepared rows of task {LM} from {flat_root / LM / f'len{SEQ_LEN}'}" in caplog.text
  caplog.clear()
  with caplog.at_level(logging.INFO, logger="hashmoe.data.loader"):
    assert isinstance(make(prepared_dir=str(tmp_path / "none")), pipeline.TaskPipeline)
    assert isinstance(make(prepared_dir=str(flat_root), data_source="streaming"),
                      pipeline.TaskPipeline)
  assert "no prepared data there; `hashmoe prepare` with the same gin files" in caplog.text
  assert "(DATA_SOURCE='streaming')" in caplog.text
  with pytest.raises(errors.PreparedDataError, match="DATA_SOURCE='prepared' but .* has no "
                     r"manifest \(no prepared data there\): run `hashmoe prepare`"):
    make(prepared_dir=str(tmp_path / "none"), data_source="prepared")
  with pytest.raises(errors.PreparedMismatchError, match=r"DATA_SOURCE='sometimes'; expected one "
                     r"of \('auto', 'prepared', 'streaming'\)"):
    make(data_source="sometimes")
  # An unfinished prepare is not used: the run streams, and says why.
  partial = tmp_path / "partial"
  preparation.prepare(LM, prepared.prepared_dir(partial, LM, SEQ_LEN), seq_len=SEQ_LEN,
                   num_shards=NUM_SHARDS, shard_indices=[0], progress=False)
  caplog.clear()
  with caplog.at_level(logging.INFO, logger="hashmoe.data.loader"):
    assert isinstance(make(prepared_dir=str(partial)), pipeline.TaskPipeline)
  assert "its prepare is unfinished (3 of 9 shards)" in caplog.text
  # A folder of another SEQ_LEN under this run's name is refused, not used.
  moved = tmp_path / "moved"
  shutil.copytree(root / LM, moved / LM / "len64")
  with pytest.raises(errors.PreparedMismatchError, match='feature_lengths: {"targets": 32} '
                     'there, {"targets": 64} here'):
    loader.make_input_pipeline(LM, batch_size=8, seq_len=64, seed=0, prepared_dir=str(moved))


def test_a_checkpoint_position_serves_another_process_count_only_if_it_names_a_global_batch():
  own = checkpoints._own_position  # pylint: disable=protected-access
  prepared_position = {"format": loader.POSITION_FORMAT, "next_batch": 5,
                       "any_process_count": True}
  assert own([prepared_position] * 4, step=5) == prepared_position  # 4 hosts saved, 1 resumes
  streaming = [{"format": "hashmoe.BatchIteratorState/1", "shard_index": i} for i in range(2)]
  with pytest.raises(errors.CheckpointError, match="saved by 2 processes, this run has 1; the "
                     "streaming input pipeline cannot resume exactly across a change of host "
                     "count"):
    own(streaming, step=5)
  with pytest.raises(errors.CheckpointError):
    own([prepared_position, {**prepared_position, "next_batch": 6}], step=5)


# --------------------------------------------------------------------------------------------------
# The command.


@pytest.fixture
def fresh_text_tasks():
  """text_dir.gin's task names unregistered before and after: seqio's registry is global, and
  other files' in-process runs register them on other folders."""
  import seqio

  def remove():
    for name in list(seqio.TaskRegistry.names()):
      if name.startswith("hashmoe_text_"):
        seqio.TaskRegistry.remove(name)

  remove()
  yield
  remove()


@pytest.mark.usefixtures("fresh_text_tasks")
def test_prepare_command_errors(world, tmp_path, capsys, monkeypatch):
  monkeypatch.setenv("HASHMOE_CACHE", str(world["base"] / "cache"))
  base = ["prepare", "--gin_file=configs/runs/cpu_tiny.gin",
          "--gin_file=configs/tasks/text_dir.gin", f"--gin.TEXT_DIR='{world['texts']}'",
          "--gin.VOCAB_SIZE=320", f"--gin.SEQ_LEN={SEQ_LEN}", "--no_progress",
          f"--gin.PREPARED_DIR='{tmp_path / 'root'}'", "--compilation_cache_dir=none"]

  def run(*extra):
    capsys.readouterr()
    code = cli.main(base + list(extra))
    return code, capsys.readouterr()

  code, (_, err) = run("--shard_indices=0,x")
  assert code == 2 and err == ("hashmoe prepare: error: --shard_indices='0,x': 'x' is not a "
                               "shard index or a range such as 0-3\n")
  code, (_, err) = run("--num_shards=2", "--shard_indices=1-2")
  assert code == 2 and err == ("hashmoe prepare: error: --shard_indices='1-2': expected distinct "
                               "shards in [0, 2); [2] are not\n")
  code, (_, err) = run("--verify")
  folder = tmp_path / "root" / "hashmoe_text_lm" / f"len{SEQ_LEN}"
  assert code == 1 and err == (f"hashmoe prepare: error: {folder} has no prepare.json: not a "
                               "prepared folder\n")
  code, (out, _) = run("--num_shards=2", "--shard_indices=1", "--workers=1")
  summary = json.loads(out.strip().splitlines()[-1])
  assert code == 0 and not summary["complete"] and summary["missing"] == 3
  code, (_, err) = run("--num_shards=3")
  assert code == 2 and "is being prepared for another plan (num_shards: 2 there, 3 here)" in err
  code, (out, _) = run("--num_shards=2", "--workers=1")
  summary = json.loads(out.strip().splitlines()[-1])
  assert code == 0 and summary["complete"] and (summary["kept"], summary["prepared"]) == (3, 3)
  assert summary["gin_flag"] == f"--gin.PREPARED_DIR=\"'{tmp_path / 'root'}'\""
  code, (out, _) = run("--num_shards=2", "--verify")
  assert code == 0 and json.loads(out)["verified"]


# --------------------------------------------------------------------------------------------------
# Done when: `hashmoe train` on prepared data, SIGKILLed at a random step and restarted.


STEPS, PERIOD = 24, 4


def cli_train(model_dir, texts, root):
  return [sys.executable, "-m", "hashmoe.cli", "train",
          "--gin_file=configs/runs/cpu_tiny.gin", "--gin_file=configs/tasks/text_dir.gin",
          f"--gin.TEXT_DIR='{texts}'", "--gin.VOCAB_SIZE=320", f"--gin.MODEL_DIR='{model_dir}'",
          f"--gin.TRAIN_STEPS={STEPS}", f"--gin.CHECKPOINT_PERIOD={PERIOD}",
          "--gin.EVAL_PERIOD=0", f"--gin.SEQ_LEN={SEQ_LEN}", f"--gin.PREPARED_DIR='{root}'",
          "--gin.DATA_SOURCE='prepared'", "--gin.train.progress_bar=False"]


def losses(model_dir):
  return {r["step"]: r["loss"] for r in map(json.loads, open(model_dir / "metrics.jsonl"))}


def test_train_on_prepared_data_killed_at_a_random_step_restarts_with_every_loss_equal(
    world, tmp_path, jax_cache_dir):
  """The restart guarantee on prepared data: an uninterrupted `hashmoe train` and a twin
  SIGKILLed at a random step after its first checkpoint, then started again with the same
  command. The twin's losses equal the uninterrupted run's bit for bit, step for step; the
  restart continued from its checkpoint's loader position (no replay: the position names the
  global batch, and the run logs that it read prepared rows)."""
  env = dict(os.environ, HASHMOE_CACHE=str(tmp_path / "cache"), JAX_PLATFORMS="cpu",
             TF_CPP_MIN_LOG_LEVEL="2", JAX_COMPILATION_CACHE_DIR=str(jax_cache_dir),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", XLA_FLAGS="",
             PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in os.environ.get(
                 "PYTHONPATH", "").split(os.pathsep) if p]))
  root = tmp_path / "prepared"
  done = subprocess.run(cli_prepare(world["texts"], "--workers=1",
                                    f"--gin.PREPARED_DIR='{root}'"),
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  kill_after = int(np.random.default_rng().integers(PERIOD + 1, STEPS - 2))
  reference = subprocess.Popen(cli_train(tmp_path / "reference", world["texts"], root), cwd=REPO,
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
  twin = tmp_path / "twin"
  proc = subprocess.Popen(cli_train(twin, world["texts"], root), cwd=REPO, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 300
    while not ((twin / "metrics.jsonl").exists() and
               len((twin / "metrics.jsonl").read_text().splitlines()) >= kill_after):
      assert proc.poll() is None, f"training exited early with {proc.returncode}"
      assert time.time() < deadline, f"no {kill_after} steps in 300 s"
      time.sleep(0.02)
    proc.kill()
  finally:
    proc.wait(timeout=60)
    _, reference_err = reference.communicate(timeout=600)
  assert reference.returncode == 0, reference_err[-3000:]
  assert proc.returncode == -signal.SIGKILL
  killed_at = max(losses(twin))
  assert "data: prepared rows of task hashmoe_text_lm" in reference_err
  restarted = subprocess.run(cli_train(twin, world["texts"], root), cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=600)
  assert restarted.returncode == 0, restarted.stderr[-3000:]
  summary = json.loads(restarted.stdout.strip().splitlines()[-1])
  assert 0 < summary["start_step"] <= killed_at and summary["start_step"] % PERIOD == 0
  assert "data: prepared rows of task hashmoe_text_lm" in restarted.stderr
  assert losses(twin) == losses(tmp_path / "reference")  # bit-equal, step for step
  assert sorted(losses(twin)) == list(range(1, STEPS + 1))
  meta = json.loads((twin / "checkpoints" / str(STEPS) / "data" / "metadata").read_text())
  (position,) = meta["positions"]
  assert (position["format"], position["next_batch"], position["any_process_count"]) == (
      loader.POSITION_FORMAT, STEPS, True)


def test_compare_reads_the_prepared_rows_of_its_corpus_once_prepare_wrote_them(world, tmp_path,
                                                                              monkeypatch):
  """`hashmoe compare --prepare` prepares its corpus where its pipelines then find it; without
  prepared rows they stream as before."""
  from hashmoe.compare import cli as compare_cli
  from hashmoe.data import cached
  monkeypatch.setenv("HASHMOE_CACHE", str(tmp_path / "cache"))
  corpus = cached.register_corpus(world["texts"], 320)
  streaming = cached.CachedPipeline(corpus.task, batch_size=8, seq_len=SEQ_LEN, seed=1)
  assert isinstance(streaming._source, pipeline.TaskPipeline)  # pylint: disable=protected-access
  said = []
  compare_cli._prepare(corpus.task, SEQ_LEN, said.append)  # pylint: disable=protected-access
  folder = prepared.prepared_dir(None, corpus.task, SEQ_LEN)
  assert said == [f"hashmoe compare: prepared data in {folder} (3 shard(s) written, 0 kept)"]
  data = cached.CachedPipeline(corpus.task, batch_size=8, seq_len=SEQ_LEN, seed=1)
  assert isinstance(data._source, loader.PreparedPipeline)  # pylint: disable=protected-access
  reference = loader.batches(prepared.read_manifest(folder), batch_size=8, seed=1)
  for index in range(3):
    want = next(reference)
    for name, values in data.train_batch(index).items():
      np.testing.assert_array_equal(values, want[name])
  assert data.eval_batches("test", 1)[0]["decoder_target_tokens"].shape == (8, SEQ_LEN)


def _files(folder):
  import hashlib
  return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.usefixtures("compilation_cache")
def test_a_run_that_switches_between_streamed_and_prepared_data_is_refused_before_writing(
    world, tmp_path):
  """A checkpoint written while streaming, resumed where prepared rows now exist (or the
  reverse), would continue another batch sequence: refused (a usage error naming the fix), and
  MODEL_DIR left as it was."""
  from hashmoe import models, sharding
  from hashmoe import train as train_lib
  from hashmoe.training import optim
  config = models.tiny_config(vocab_size=320, num_encoder_layers=0, max_len=SEQ_LEN)
  sources = {"streaming": pipeline.TaskPipeline(LM, batch_size=8, seq_len=SEQ_LEN, seed=0),
             "prepared": loader.PreparedPipeline(LM, batch_size=8, seq_len=SEQ_LEN, seed=0,
                                                 manifest=manifest_of(world, LM))}

  def train(model_dir, source, steps):
    schedule = optim.learning_rate_schedule(1e-3, warmup_steps=0, decay="constant")
    return train_lib.train(
        model_dir=str(model_dir), model_config=config, task=LM, train_steps=steps, batch_size=8,
        seq_len=SEQ_LEN, seed=0, optimizer=optim.make_optimizer(schedule),
        mesh=sharding.make_mesh(), checkpoint_period=2, eval_period=0, log_period=1,
        progress_bar=False, tensorboard=False, async_checkpointing=False,
        input_pipeline=sources[source])

  for first, then, message in (
      ("streaming", "prepared", "written by the streaming pipeline"),
      ("prepared", "streaming", "written by the prepared-data loader")):
    model_dir = tmp_path / first
    assert train(model_dir, first, 2).step == 2
    before = _files(model_dir)
    with pytest.raises(errors.PreparedMismatchError, match=message) as raised:
      train(model_dir, then, 4)
    assert isinstance(raised.value, errors.ConfigError)  # exit 2
    assert _files(model_dir) == before
    assert train(model_dir, first, 4).start_step == 2  # the original data resumes


def test_a_remote_folder_is_staged_locally_once_and_checked_by_sha256(world, tmp_path,
                                                                      monkeypatch):
  """ArrayRecord reads local files: a bucket's shards are copied once into the local cache (keyed
  by the manifest's fingerprint), checked there against the manifest's sha256; a damaged copy in
  the bucket is an error, never read. (The "bucket" is a folder that `is_local` calls remote.)"""
  bucket = tmp_path / "remote"
  shutil.copytree(ref_dir(world, LM), bucket)
  monkeypatch.setenv("HASHMOE_CACHE", str(tmp_path / "cache"))
  monkeypatch.setattr(prepared, "is_local", lambda path: "/remote" not in os.fspath(path))
  open_it = lambda: prepared.open_prepared(bucket, task=LM, shape="lm",
                                           vocab_fingerprint=fingerprint(LM), seq_len=SEQ_LEN)
  manifest = open_it()
  staged = tmp_path / "cache" / "prepared_staged" / manifest.fingerprint
  assert manifest.local_directory == staged and manifest.directory == bucket
  assert manifest.shard_paths("train") == [str(staged / prepared.shard_file("train", k, NUM_SHARDS))
                                           for k in range(NUM_SHARDS)]
  first = next(loader.batches(manifest, batch_size=8, seed=0))
  want = next(loader.batches(manifest_of(world, LM), batch_size=8, seed=0))
  for name in want:
    np.testing.assert_array_equal(first[name], want[name])
  mtimes = {p: p.stat().st_mtime_ns for p in staged.rglob("*.arrayrecord")}
  assert len(mtimes) == NUM_SHARDS
  open_it()  # staged already: nothing copied again
  assert {p: p.stat().st_mtime_ns for p in staged.rglob("*.arrayrecord")} == mtimes
  shutil.rmtree(staged)
  shard = bucket / prepared.shard_file("train", 0, NUM_SHARDS)
  data = shard.read_bytes()
  shard.write_bytes(data[:50] + bytes([data[50] ^ 1]) + data[51:])
  with pytest.raises(errors.PreparedDataError, match=f"prepared shard {shard}: the copy's sha256 "
                     r"differs from the manifest's \(damaged in the bucket\)"):
    open_it()
  assert not list(staged.rglob("*.arrayrecord*"))
