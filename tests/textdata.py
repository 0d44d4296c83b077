"""Generated corpora in their real on-disk formats, for tests that read or train on them (no
network): English-like text folders, Wikitext `.tokens` folders, CC100 `en.txt.xz`, and
pushshift.io Reddit dumps (newline-delimited JSON, zstd / bz2 / xz / gzip / plain)."""
import bz2
import gzip
import hashlib
import json
import lzma

import numpy as np
import zstandard

WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at "
         "which but have an they you were her she there one all we their has been would when who "
         "will more no if out so said what up its about into than them can only other new some "
         "could time these two may then do first any my now such like our over man me even most "
         "made after also did many before must through back years where much your way well down "
         "should because each just those people how too little state good very make world").split()


def write_text_folder(root, files=5, paragraphs=40, seed=0):
  """A folder of generated English-like text (Zipf-distributed common words)."""
  rng = np.random.default_rng(seed)
  p = 1.0 / np.arange(1, len(WORDS) + 1)
  p /= p.sum()
  root.mkdir(parents=True, exist_ok=True)
  for f in range(files):
    paras = [" ".join(" ".join(rng.choice(WORDS, size=rng.integers(4, 14), p=p)).capitalize()
                      + "." for _ in range(rng.integers(2, 6))) for _ in range(paragraphs)]
    (root / f"doc{f}.txt").write_text("\n\n".join(paras) + "\n")
  return root


# --------------------------------------------------------------------------------------------------
# Syllable text (a `random.Random` stream), Wikitext and CC100.


def syllable_words(rng, n):
  syllables = ["ka", "lo", "mi", "ter", "an", "sol", "ve", "ri", "nu", "pe", "ost", "ing"]
  return ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(n)]


def syllable_sentences(rng, n):
  return " ".join(" ".join(syllable_words(rng, rng.randint(3, 10))).capitalize() + "."
                  for _ in range(n))


def write_wikitext(folder, rng, articles=(6, 2, 2), train_word_types=None):
  """`wiki.{train,valid,test}.tokens` in the original layout (leading space, ' \\n' endings).

  Args:
    articles: articles of the train, valid and test files.
    train_word_types: if given, a last training article of new words brings the training file's
      distinct whitespace tokens (`<unk>` aside) to exactly this many, so that its word-level
      dictionary has `train_word_types + 3` ids (pad, eos, unk).
  """
  folder.mkdir()
  for split, count in zip(("train", "valid", "test"), articles):
    lines = []
    for a in range(count):
      lines += [" ", f" = {split.title()} Article {a} = ", " "]
      for p in range(3):
        if p == 1:
          lines += [" = = Section = = ", " "]
        sentences = []
        for _ in range(rng.randint(1, 4)):
          words = syllable_words(rng, rng.randint(3, 14))
          words.insert(1, "well @-@ known")
          sentences.append(" ".join(words).capitalize() + " " + rng.choice([".", "!", "?"]))
        lines += [" " + " ".join(sentences) + " ", " "]
    if split == "train" and train_word_types is not None:
      lines += [" ", " = Glossary = ", " "]
      missing = train_word_types - len(set(" ".join(lines).split()) - {"<unk>"})
      if missing < 0:
        raise ValueError(f"the training file already has {train_word_types - missing} word types")
      # Glossary sentences of 8 new words each, as a Wikitext paragraph line.
      glossary = [f"gloss{i}" for i in range(missing)]
      for start in range(0, missing, 8):
        lines += [" " + " ".join(glossary[start:start + 8]) + " ", " "]
    (folder / f"wiki.{split}.tokens").write_text("\n".join(lines) + "\n", encoding="utf-8")
  return folder


def _cc100_document_share(text):
  """Where CC100's documented split puts a document: a uniform [0, 1) from BLAKE2b-64 of its text
  (paragraphs joined by '\\n'); below 0.001 is test, below 0.002 validation (the defaults)."""
  digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
  return int.from_bytes(digest, "big") / 2.0**64


def write_cc100(path, rng, documents=25, held_out=0):
  """A CC100 `en.txt.xz`: one paragraph per line, a blank line between documents.

  Args:
    documents: documents drawn at random (at the default 0.1% held-out fractions, nearly all of
      them land in train).
    held_out: then more documents are drawn until this many land in each of validation and test
      (the rest of those draws are dropped), so a small file has every split.
  """
  def document():
    return "\n".join(syllable_sentences(rng, rng.randint(1, 3)) for _ in range(rng.randint(1, 3)))

  texts = [document() for _ in range(documents)]
  found = {"validation": 0, "test": 0}
  while min(found.values()) < held_out:
    text = document()
    share = _cc100_document_share(text)
    split = "test" if share < 0.001 else "validation" if share < 0.002 else None
    if split is not None and found[split] < held_out:
      found[split] += 1
      texts.append(text)
  path.write_bytes(lzma.compress(("\n\n".join(texts) + "\n").encode("utf-8")))
  return path


# --------------------------------------------------------------------------------------------------
# pushshift.io Reddit.


def ndjson(records, newline="\n"):
  """Records as newline-delimited JSON bytes, as pushshift writes them."""
  return "".join(json.dumps(r, ensure_ascii=False) + newline for r in records).encode("utf-8")


def compress(data, fmt):
  """`data` compressed as 'zst', 'bz2', 'xz', 'gz', or left 'plain'."""
  if fmt == "zst":
    return zstandard.ZstdCompressor().compress(data)
  if fmt == "bz2":
    return bz2.compress(data)
  if fmt == "xz":
    return lzma.compress(data)
  if fmt == "gz":
    return gzip.compress(data)
  assert fmt == "plain"
  return data


def reddit_comment(cid, parent, link, body, author="alice", created=1_400_000_000, **extra):
  """A comment record with the fields of a pushshift RC_* line."""
  record = {"id": cid, "parent_id": parent, "link_id": link, "body": body, "author": author,
            "created_utc": created, "subreddit": "test", "subreddit_id": "t5_2qh1i", "score": 1,
            "edited": False}
  record.update(extra)
  return record


def reddit_submission(pid, title, selftext="", created=1_400_000_000, **extra):
  """A submission record with the fields of a pushshift RS_* line."""
  record = {"id": pid, "title": title, "selftext": selftext, "url": "", "is_self": bool(selftext),
            "author": "op", "subreddit": "test", "created_utc": created, "score": 5,
            "num_comments": 0, "over_18": False}
  record.update(extra)
  return record


def write_reddit(folder, rng, threads=40, comment_files=(("RC_2016-01", "zst"),),
                 submission_file=("RS_2016-01", "xz")):
  """Threads of a title, a selftext and a chain of three comments, as pushshift dumps.

  The comments are in time order, as in the dumps, so threads interleave; with several
  `comment_files` (name, format) consecutive stretches of time go to consecutive files, as months
  do, and threads span files.

  Returns:
    ([comment dump paths], [the submission dump path]).
  """
  comments, submissions = [], []
  for n in range(threads):
    post = f"p{n:03d}"
    submissions.append(reddit_submission(post, f"{syllable_sentences(rng, 1)} {post}",
                                         syllable_sentences(rng, 1), score=1))
    parent = f"t3_{post}"
    for depth in range(3):
      cid = f"{post}c{depth}"
      comments.append(reddit_comment(cid, parent, f"t3_{post}",
                                     syllable_sentences(rng, rng.randint(1, 2)),
                                     author=f"user{depth}",
                                     created=1_400_000_000 + rng.randint(0, 999)))
      parent = f"t1_{cid}"
  comments.sort(key=lambda c: c["created_utc"])
  per_file = -(-len(comments) // len(comment_files))
  rc = []
  for i, (name, fmt) in enumerate(comment_files):
    path = folder / f"{name}.{fmt}"
    path.write_bytes(compress(ndjson(comments[i * per_file:(i + 1) * per_file]), fmt))
    rc.append(path)
  name, fmt = submission_file
  rs = folder / f"{name}.{fmt}"
  rs.write_bytes(compress(ndjson(submissions), fmt))
  return rc, [rs]
