"""The demo corpus: a mixed-quality pool with every document labelled by `source`.

On-target (for an English reference): English Wikipedia summaries. Other real text: BBC news
(English, another register), Spanish and French Wikipedia summaries. Deterministic junk tiers,
made only from pool documents: word-shuffled English, templated spam, character noise, and
near-duplicates. Target and evaluation sets come from documents held out of the pool entirely
(no junk tier is made from them either), each from documents in no other set:

* `targets/wiki_en.jsonl` {"text"} (lm: every token) and `targets/wiki_en_cloze.jsonl`
  {"context", "target"} (cloze: LAMBADA style, the final word only): what curation aims at;
* `eval/wiki_en.jsonl` (lm), `eval/wiki_en_cloze.jsonl` (cloze): the target's domain, other
  documents; `eval/bbc_en.jsonl` (lm): held-out BBC news, English but not the target domain.

Output files: `corpus.jsonl` ({"id", "text", "source"}), `targets/*.jsonl`, `eval/*.jsonl`.
Texts are de-duplicated (normalised sha1) before the split, so the sets are disjoint by hash too.
"""
from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass

from curation.data import sources
from curation.data.sets import EVAL, TARGETS, normalised_sha1


@dataclass(kw_only=True)
class DemoCorpusConfig:
    seed: int = 0
    n_target: int = 256                 # examples per target set
    n_eval: int = 256                   # examples per eval set
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


def _unique(items: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Drop texts whose normalised sha1 was seen before (keeps the first, in the given order)."""
    seen, out = set(), []
    for key, text in items:
        h = normalised_sha1(text)
        if h not in seen:
            seen.add(h)
            out.append((key, text))
    return out


def _cloze_set(held: list[tuple[str, str]], rng: random.Random) -> list[dict]:
    return [ex for _, text in held if (ex := _cloze_example(text, rng))]


def build_demo_corpus(cfg: DemoCorpusConfig) -> tuple[list[dict], dict[str, list[dict]], dict[str, list[dict]]]:
    """Return (corpus docs, {target: rows}, {eval set: rows}); deterministic in `cfg.seed`."""
    rng = random.Random(cfg.seed)
    english = _unique(sources.wiki_summaries("en"))
    rng.shuffle(english)
    cuts = [0, cfg.n_target, 2 * cfg.n_target, 2 * cfg.n_target + cfg.n_eval, 2 * cfg.n_target + 2 * cfg.n_eval]
    held = [english[a:b] for a, b in zip(cuts, cuts[1:])]
    english = english[cuts[-1]:]
    bbc = _unique(sources.bbc_news())
    rng.shuffle(bbc)
    bbc_held, bbc = bbc[: cfg.n_eval], sorted(bbc[cfg.n_eval:])
    targets = {"wiki_en": [{"text": t} for _, t in held[0]], "wiki_en_cloze": _cloze_set(held[1], rng)}
    evals = {"wiki_en": [{"text": t} for _, t in held[2]], "wiki_en_cloze": _cloze_set(held[3], rng),
             "bbc_en": [{"text": t} for _, t in bbc_held]}

    cap = cfg.max_per_source
    english = english[:cap] if cap else english
    docs: list[dict] = [{"id": f"wiki_en/{t}", "text": x, "source": "wiki_en"} for t, x in english]
    for lang in ("es", "fr"):
        items = sources.wiki_summaries(lang)
        docs += [{"id": f"wiki_{lang}/{t}", "text": x, "source": f"wiki_{lang}"}
                 for t, x in (items[:cap] if cap else items)]
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
    return docs, targets, evals


def write_jsonl(path: str, rows: list[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def write_demo_corpus(out_dir: str, cfg: DemoCorpusConfig) -> dict:
    """Write corpus.jsonl, targets/*.jsonl and eval/*.jsonl; return per-source and per-set counts."""
    docs, targets, evals = build_demo_corpus(cfg)
    for role, sets in ((TARGETS, targets), (EVAL, evals)):
        os.makedirs(os.path.join(out_dir, role), exist_ok=True)
        for name, rows in sets.items():
            write_jsonl(os.path.join(out_dir, role, f"{name}.jsonl"), rows)
    write_jsonl(os.path.join(out_dir, "corpus.jsonl"), docs)
    counts: dict[str, int] = {}
    for d in docs:
        counts[d["source"]] = counts.get(d["source"], 0) + 1
    return {"documents": len(docs), "sources": counts,
            "targets": {n: len(r) for n, r in targets.items()}, "eval": {n: len(r) for n, r in evals.items()}}


def demo_set_files(out_dir: str) -> tuple[dict[str, str], dict[str, str]]:
    """({target: file}, {eval set: file}) of a demo corpus folder, in the order ingest stamps them."""
    def files(role: str, names: tuple[str, ...]) -> dict[str, str]:
        return {n: os.path.join(out_dir, role, f"{n}.jsonl") for n in names}

    return files(TARGETS, ("wiki_en", "wiki_en_cloze")), files(EVAL, ("wiki_en", "wiki_en_cloze", "bbc_en"))
