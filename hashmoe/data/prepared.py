"""Prepared data: a task's rows tokenised, split and packed once, in random-access shards.

`hashmoe prepare` (`prepare`) runs a registered task's preprocessing exactly as the training
pipeline does (`tasks.converted_dataset`: tokenize, check ids, EOS, cut LM examples into SEQ_LEN
pieces / trim seq2seq examples, then seqio's training feature converter with packing; no shuffle)
and writes the packed rows to ArrayRecord files with a manifest. `hashmoe.data.loader` reads them
with grain: a global shuffle per epoch, each process's share of every global batch, and a position
that restores in O(1).

On-disk format (FORMAT_VERSION 1). One folder per (task, SEQ_LEN), by default
`<cache>/prepared/<task>/len<SEQ_LEN>` (`prepared_dir`; the root is gin's PREPARED_DIR):

    prepare.json                      the plan: what every shard is prepared for (below)
    <split>/rows-KKKKK-of-NNNNN.arrayrecord     shard K of N of the split: its packed rows
    <split>/rows-KKKKK-of-NNNNN.done.json       the shard's done record: rows, tokens, bytes, sha256
    manifest.json                     written once every shard of every split is done

* Shards. Shard k of N holds the packed rows of the split's examples with index % N == k, in the
  reader's order (seqio's example-level sharding, `tasks.get_batches(shard_index=k,
  num_shards=N)`, before packing: packing never crosses shards). Shards are independent units:
  prepared in parallel by worker processes, by several hosts (`shard_indices`: disjoint sets into
  one folder, e.g. a bucket), and redone one by one.
* Records. One packed row per record, all of the feature converter's int32[L] features
  concatenated in the manifest's `record` order, each stored in the narrowest dtype that holds its
  values (`uint16` for token ids of a vocabulary up to 65,536, for segment ids and positions of
  rows up to 65,536; `uint8` for loss weights; `int32` otherwise) and widened back to int32 on
  read. Why: a fixed layout decodes a whole batch with one `np.frombuffer` (no per-row parsing, no
  protobuf), and the loader yields exactly the arrays the streaming pipeline yields (the test
  compares them); the narrow dtypes make an LM row 9 bytes per token instead of 20. Derivable
  features (decoder inputs from targets, loss weights from segment ids) are stored rather than
  recomputed so that no second implementation of seqio's converter can drift from it. Files are
  written with `group_size:1` (grain's random access reads one record without decoding its
  neighbours); riegeli checksums every chunk, so a damaged byte fails the read that meets it.
* Done record (`<shard>.done.json`): {format, split, shard, num_shards, rows, tokens (non-padding
  decoder targets), input_tokens (seq2seq: non-padding encoder inputs), bytes, sha256, data
  (`tasks.data_fingerprint` of the split as read)}. Written after the shard file is complete and
  renamed into place; a shard without one is unfinished.
* Plan (`prepare.json`): {format, task, shape, vocabulary (fingerprint and size), feature_lengths,
  converter ({"name": "DecoderFeatureConverter"|"EncDecFeatureConverter", "pack": true}), record
  layout, splits, num_shards}. The first `prepare` writes it; every later one (a resume, another
  host) must name the same plan, or it is refused (another task, vocabulary, SEQ_LEN or shard
  count would mix incompatible shards in one folder).
* Manifest (`manifest.json`): the plan plus, per split, rows, tokens, input_tokens and its shards
  ({file, rows, tokens, input_tokens, bytes, sha256}), and `fingerprint`: a sha256 over the plan
  and every shard's sha256 (what a checkpoint's loader position names). Written atomically by
  whichever `prepare` finds every shard done (the last host to finish, or `hashmoe prepare
  --verify` run once all are); readers use a folder only once it has a manifest.

Writes are atomic: a shard is written under a temporary name and renamed (on a remote folder,
written locally and copied); the done record and manifest likewise. Resuming: an interrupted
prepare leaves finished shards (done record + file) and temporary files; the next `prepare`
verifies every finished shard's sha256 against its done record (redoing any that fails: a
truncated or damaged file is never trusted), deletes temporary files and does only the rest.
A full disk (or any write error) ends the prepare with an OSError naming the path, the partial
shard removed and the finished ones kept.

Reading (`open_prepared`, used by the loader): the manifest must match the run (task, vocabulary
fingerprint, feature lengths, converter, format), or `PreparedMismatchError` names each
difference. Every shard must exist with its manifest size and record count; its sha256 is checked
too when the split's files total at most `FULL_CHECK_BYTES` (a restart then costs seconds, not a
read of the whole corpus); `hashmoe prepare --verify` checks every sha256 of any size.
A remote folder (gs://...) is read through etils.epath: its shards are copied once to a local
staging folder (verified by sha256 there), since ArrayRecord reads local files.

Public API (what the loader, the CLI, benchmarks and t5x's file-backed task build on):

    prepared_dir(root, task, seq_len) -> epath.Path
    prepare(task, out_dir, *, seq_len, splits, num_shards, shard_indices=None, workers=1,
            progress=True) -> PrepareResult
    verify(out_dir) -> Manifest                      # full sha256 of every shard
    open_prepared(out_dir, *, task, vocab_fingerprint, feature_lengths, shape) -> Manifest
    Manifest.shard_paths(split) -> list[str]; Manifest.record_dtype; decode_rows(records, dtype)
"""
