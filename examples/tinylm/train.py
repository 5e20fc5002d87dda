"""Trains tinylm: a word-level trigram language model with interpolated backoff, on
Caravel's own documentation (so the licence is ours). Writes model.json next to this file.

    python3 examples/tinylm/train.py            # from the repository root

Stdlib only. The model is small (a few hundred KB) and honest: every generated token is a
sample from counts learned here.
"""
import collections, glob, json, os, re

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
TOKEN = re.compile(r"[A-Za-z][A-Za-z0-9_'-]*|[0-9]+(?:\.[0-9]+)?|[.,;:!?()%]")


def tokens(text):
    # Code blocks and tables read poorly as prose: drop them.
    text = re.sub(r"```.*?```", " ", text, flags=re.S)
    text = "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("|"))
    return [t.lower() for t in TOKEN.findall(text)]


def main():
    files = sorted(glob.glob(os.path.join(ROOT, "docs", "*.md"))) + [os.path.join(ROOT, "README.md")]
    toks = []
    for f in files:
        toks += ["<s>", "<s>"] + tokens(open(f, encoding="utf-8").read())
    uni = collections.Counter(toks)
    vocab = [w for w, c in uni.most_common() if c >= 2]
    index = {w: i for i, w in enumerate(vocab)}
    unk = len(vocab)
    ids = [index.get(t, unk) for t in toks]
    bi = collections.defaultdict(collections.Counter)
    tri = collections.defaultdict(collections.Counter)
    for a, b, c in zip(ids, ids[1:], ids[2:]):
        bi[b][c] += 1
        tri[f"{a} {b}"][c] += 1
    model = {
        "vocab": vocab,
        "unigram": [uni[w] for w in vocab],
        "bigram": {str(k): dict(v) for k, v in bi.items()},
        "trigram": {k: dict(v) for k, v in tri.items() if sum(v.values()) >= 2},
        "trained_on": [os.path.relpath(f, ROOT) for f in files],
        "tokens": len(toks),
    }
    out = os.path.join(HERE, "model.json")
    with open(out, "w") as f:
        json.dump(model, f, separators=(",", ":"))
    print(f"{len(toks)} tokens, {len(vocab)} words, {len(model['trigram'])} trigram contexts -> {out} ({os.path.getsize(out)} bytes)")


if __name__ == "__main__":
    main()
