"""The demo corpus: a mixed-quality pool with every document labelled by `source`.

On-target (for an English reference): English Wikipedia summaries. Other real text: BBC news
(English, another register), Spanish and French Wikipedia summaries. Deterministic junk tiers,
made only from pool documents: word-shuffled English, templated spam, character noise, and
near-duplicates. Reference sets come from English summaries held out of the pool entirely (no
junk tier is made from them either):

* `reference/cloze.jsonl`: LAMBADA-style, {"context", "target"}: loss on the final word only;
* `reference/heldout.jsonl`: {"text"}: held-out perplexity.

Output files: `corpus.jsonl` ({"id", "text", "source"}) and the two reference files.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
from dataclasses import dataclass

from curation.data import sources


@dataclass(kw_only=True)
class DemoCorpusConfig:
    seed: int = 0
    n_cloze: int = 256
    n_heldout: int = 256
    max_per_source: int | None = None   # cap on each real source (None = all)
    junk_fraction: float = 0.12         # each junk tier's size as a fraction of English docs


_SPAM_TEMPLATES = [
    "CLICK HERE to get your FREE {a} today!!! Limited offer, buy {b} now and save 90% on {a}. "
    "Best {b} deals online, cheap {a}, discount {b}, order now, free shipping, act fast!!!",
    "Home | About | Contact | Login | Register | {a} | {b} | Privacy Policy | Terms of Use | "
    "Cookie settings | Copyright 2024 All rights reserved | {a} {b} {a} {b} | Subscribe",
    "Top 10 {a} you won't believe! Number 7 will shock you. {b} {b} {b}. Share this with "
    "your friends. Like and subscribe for more {a} content. Sponsored: {b} casino bonus.",
]


def _sha1(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def _cloze_example(text: str, rng: random.Random) -> dict | None:
    """Context up to the last word of a passage; the target is that word (LAMBADA style)."""
    words = text.split()
    ends = [i for i, w in enumerate(words[:80]) if i >= 12 and re.fullmatch(r"[A-Za-z]{3,}[.,;]?", w)]
    if not ends:
        return None
    end = ends[-1] if len(ends) < 3 else rng.choice(ends[len(ends) // 2:])
    target = re.sub(r"[.,;]$", "", words[end])
    return {"context": " ".join(words[:end]), "target": " " + target}


def _char_noise(text: str, rng: random.Random, rate: float = 0.2) -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789#@%&*"
    return "".join(rng.choice(alphabet) if c != " " and rng.random() < rate else c for c in text)


def _near_duplicate(text: str, rng: random.Random) -> str:
    words = text.split()
    for _ in range(max(1, len(words) // 50)):
        words[rng.randrange(len(words))] = rng.choice(words)
    return " ".join(words)


def build_demo_corpus(cfg: DemoCorpusConfig) -> tuple[list[dict], list[dict], list[dict]]:
    """Return (corpus docs, cloze examples, heldout docs); deterministic in `cfg.seed`."""
    rng = random.Random(cfg.seed)
    english = sources.wiki_summaries("en")
    rng.shuffle(english)
    held, english = english[: cfg.n_cloze + cfg.n_heldout], english[cfg.n_cloze + cfg.n_heldout:]
    cloze = [ex for _, text in held[: cfg.n_cloze] if (ex := _cloze_example(text, rng))]
    heldout = [{"text": text} for _, text in held[cfg.n_cloze:]]

    cap = cfg.max_per_source
    english = english[:cap] if cap else english
    docs: list[dict] = [{"id": f"wiki_en/{t}", "text": x, "source": "wiki_en"} for t, x in english]
    for lang in ("es", "fr"):
        items = sources.wiki_summaries(lang)
        docs += [{"id": f"wiki_{lang}/{t}", "text": x, "source": f"wiki_{lang}"}
                 for t, x in (items[:cap] if cap else items)]
    bbc = sources.bbc_news()
    docs += [{"id": f"bbc/{k}", "text": x, "source": "bbc_news"} for k, x in (bbc[:cap] if cap else bbc)]

    n_junk = max(1, int(cfg.junk_fraction * len(english)))
    vocab = sorted({w.lower() for _, x in english[:500] for w in re.findall(r"[A-Za-z]{5,}", x)})
    for i in range(n_junk):
        title, text = english[rng.randrange(len(english))]
        words = text.split()
        rng.shuffle(words)
        docs.append({"id": f"shuffled/{i}", "text": " ".join(words), "source": "shuffled"})
        template = _SPAM_TEMPLATES[i % len(_SPAM_TEMPLATES)]
        spam = " ".join(template.format(a=rng.choice(vocab), b=rng.choice(vocab))
                        for _ in range(rng.randint(2, 6)))
        docs.append({"id": f"spam/{i}", "text": spam, "source": "spam"})
        title, text = english[rng.randrange(len(english))]
        docs.append({"id": f"char_noise/{i}", "text": _char_noise(text, rng), "source": "char_noise"})
        title, text = english[rng.randrange(len(english))]
        docs.append({"id": f"near_dup/{i}", "text": _near_duplicate(text, rng), "source": "near_dup"})
    rng.shuffle(docs)
    return docs, cloze, heldout


def write_jsonl(path: str, rows: list[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def write_demo_corpus(out_dir: str, cfg: DemoCorpusConfig) -> dict:
    """Write corpus.jsonl and reference/{cloze,heldout}.jsonl; return per-source counts."""
    docs, cloze, heldout = build_demo_corpus(cfg)
    held_hashes = {_sha1(ex["context"] + ex["target"]) for ex in cloze} | {_sha1(d["text"]) for d in heldout}
    assert not any(_sha1(d["text"]) in held_hashes for d in docs), "held-out text leaked into pool"
    os.makedirs(os.path.join(out_dir, "reference"), exist_ok=True)
    write_jsonl(os.path.join(out_dir, "reference", "cloze.jsonl"), cloze)
    write_jsonl(os.path.join(out_dir, "reference", "heldout.jsonl"), heldout)
    write_jsonl(os.path.join(out_dir, "corpus.jsonl"), docs)
    counts: dict[str, int] = {}
    for d in docs:
        counts[d["source"]] = counts.get(d["source"], 0) + 1
    return {"documents": len(docs), "cloze": len(cloze), "heldout": len(heldout), "sources": counts}
