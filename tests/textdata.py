"""Generated English-like text folders for tests that train on a text_dir task (no network)."""
import numpy as np

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
