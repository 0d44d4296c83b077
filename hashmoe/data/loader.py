"""The grain loader over prepared data (`hashmoe.data.prepared`), and the run's input pipeline.

Order of the training rows. The train split's rows are numbered 0..R-1 in manifest order (shard
0's rows, then shard 1's, ...). Epoch e visits them in grain's global index shuffle
(`MapDataset.shuffle(seed)`: a Feistel-style permutation computed per index, seeded with
seed + e, so nothing of size R is materialised), and the epochs follow each other as one stream
(`repeat()`; a batch may span an epoch boundary). Global batch b is stream rows [b*B, (b+1)*B);
process p of P takes its contiguous slice [b*B + p*B/P, b*B + (p+1)*B/P) (`batch(B/P)` then every
P-th local batch from p): each process reads only its rows, and the global batch order depends on
(data, seed, B) alone, never on P.

Resume. The position in every checkpoint is {format, dataset (the manifest's fingerprint), task,
seed, batch_size (global), next_batch}; `train_batches(position)` continues at `next_batch` by
slicing the grain dataset (index arithmetic: O(1) whatever the step, no replay). A position from
another dataset (re-prepared, other content), seed or batch size is refused naming the difference,
as is one written by the streaming pipeline (or the reverse: the batch order would change).

Changing the number of hosts between stop and restart keeps the global batch order exactly: every
process saves the same position (it names a global batch), the checkpoint accepts it for any
process count (`hosts_independent`), and each process of the new run takes its slice of the same
global batches (BATCH_SIZE must still divide by the new process count). So a run stopped on 4
hosts and resumed on 2 trains on the batches the 4-host run would have. (grain's ElasticIterator
solves the same problem for pipelines whose order depends on the shard count; this one's does
not.)

Throughput: records are read in batches (`ArrayRecordDataSource.__getitems__`), decoded with one
`np.frombuffer` per batch, and prefetched by grain threads (`ReadOptions`); `worker_count` > 0 adds
grain worker processes (`mp_prefetch`). docs/PERFORMANCE.md has the measured rates.

API (benchmarks/data.py and the routing precomputation build on it):

    batches(manifest, split='train', *, batch_size, seed, start_batch=0, process_index=0,
            process_count=1, worker_count=0, prefetch=...) -> PreparedBatches
        # an iterator of this process's batches from global batch `start_batch`;
        # .position() -> the JSON position of the next batch; .close()
    eval_batches(manifest, split, *, batch_size, num_batches, process_index, process_count)
    PreparedPipeline(task, *, batch_size, seq_len, seed, directory)   # an InputPipeline
    make_input_pipeline(task, *, batch_size, seq_len, seed, prepared_dir, data_source)
        # PreparedPipeline where the task's prepared folder has a matching manifest, else
        # TaskPipeline (streaming); logs which and why
"""
