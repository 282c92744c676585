"""`mates report`: a self-contained HTML page with PNG plots, for one run or a `mates compare` folder.

Plots (each a PNG next to index.html, which holds no script and loads nothing from the network):
  - loss.png       loss on every eval set at each stage end, per method (mean and range over seeds);
  - audit.png      what each curated stage preferred, per catalog group: the oracle's z-scored
                   influence (mean +- standard error) and the method's z-scored score, with the
                   group's share of the selection against its share of the candidates;
  - sources.png    the source mix of every curated stage: its candidates, then each method's selection;
  - influence.png  predicted vs oracle influence of the probed candidates, Spearman per stage
                   (mates / group_mates; the probes are the influence model's fitting data, 90% of
                   them its training split, so this shows fit, the held-out Spearman is in the title);
  - clusters.png   Group-MATES: candidates and selected samples per cluster, with each cluster's
                   stream proportion;
  - costs.png      curation seconds per phase (stacked, from each stage's `_SUCCESS`) next to the
                   stage's training seconds, per method (first seed) and curated stage.
"""
from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass, field

import numpy as np

from curation.fit_utils import spearman
from curation.index_writer import stage_committed, stage_url
from schemas.errors import MatesError
from schemas.recipe import load_recipe
from schemas.storage import read_parquet, store_for
from schemas.tables import metrics_by_stage

SOURCE_COLORS = {"wiki_en": "#1b9e77", "wiki_fr": "#7fc97f", "wiki_es": "#beaed4", "bbc_news": "#386cb0",
                 "near_dup": "#fdc086", "spam": "#f0027f", "char_noise": "#bf5b17", "shuffled": "#666666"}


@dataclass
class RunView:
    """What the report needs from one run: its metrics and, per committed stage, its tables."""

    url: str
    method: str
    seed: int
    data: str
    metrics: list[dict]                         # one dict per stage, `loss` = {eval set: loss}
    stages: dict = field(default_factory=dict)  # k -> {"selection", "scores", "probes", "audit", "marker"}
    kinds: dict = field(default_factory=dict)   # eval set -> loss kind


def load_run(url: str) -> RunView:
    store = store_for(url)
    if not store.exists("recipe.yaml"):
        raise MatesError(f"`{url}` holds no recipe.yaml: not a mates run (nor a `mates compare` folder).")
    recipe = load_recipe(store.read_bytes("recipe.yaml").decode(), {"run": url})
    rows = read_parquet(url, "metrics.parquet").to_pylist() if store.exists("metrics.parquet") else []
    view = RunView(url, recipe.stages.method, recipe.seed, recipe.data, metrics_by_stage(rows),
                   kinds={r["eval_set"]: r["loss_kind"] for r in rows})
    for k in range(recipe.stages.count):
        if not stage_committed(url, k):
            continue
        s = store_for(stage_url(url, k))
        parts = [p for p in s.listdir("scores") if p.endswith(".parquet")]
        view.stages[k] = {
            "marker": json.loads(s.read_bytes("_SUCCESS")),
            "selection": read_parquet(stage_url(url, k), "selection.parquet").to_pydict(),
            "scores": _concat([read_parquet(stage_url(url, k), "scores", p).to_pydict() for p in parts]),
            "probes": read_parquet(stage_url(url, k), "probes.parquet").to_pydict() if s.exists("probes.parquet") else None,
            "audit": read_parquet(stage_url(url, k), "audit.parquet").to_pylist() if s.exists("audit.parquet") else None,
        }
    return view


def _concat(parts: list[dict]) -> dict | None:
    if not parts:
        return None
    return {key: sum((p[key] for p in parts), []) for key in parts[0]}


def _sources(data_url: str) -> np.ndarray:
    catalog = read_parquet(data_url, "catalog", "samples.parquet").select(["sample_id", "source"]).to_pydict()
    out = np.empty(len(catalog["sample_id"]), dtype=object)
    out[np.asarray(catalog["sample_id"])] = catalog["source"]
    return out


def _mix(sources: np.ndarray, ids) -> dict[str, float]:
    names, counts = np.unique(sources[np.asarray(ids, dtype=np.int64)], return_counts=True)
    return {str(n): c / max(counts.sum(), 1) for n, c in zip(names, counts)}


# ---------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss(runs: list[RunView], path: str) -> None:
    """One panel per eval set: its loss at each stage end, per method (band: min-max over seeds)."""
    plt = _plt()
    kinds = {}
    for r in runs:
        kinds.update(r.kinds)
    names = list(kinds)
    fig, axes = plt.subplots(1, len(names), figsize=(5.2 * len(names), 4.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        for method in dict.fromkeys(r.method for r in runs):
            mine = [r for r in runs if r.method == method and r.metrics]
            if not mine:
                continue
            n = min(len(r.metrics) for r in mine)
            tokens = np.mean([[m["tokens_seen"] for m in r.metrics[:n]] for r in mine], axis=0) / 1e6
            loss = np.array([[m["loss"].get(name, np.nan) for m in r.metrics[:n]] for r in mine])  # [seeds, points]
            line, = ax.plot(tokens, loss.mean(0), marker="o",
                            label=f"{method} ({len(mine)} seed{'s' * (len(mine) > 1)})")
            if len(mine) > 1:
                ax.fill_between(tokens, loss.min(0), loss.max(0), color=line.get_color(), alpha=0.15)
        ax.set_xlabel("training tokens (millions)")
        ax.set_ylabel(f"loss ({'target word only' if kinds[name] == 'cloze' else 'every token'})")
        ax.set_title(f"eval set {name} ({kinds[name]})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        tail = [m["loss"][name] for r in runs for m in r.metrics[2:] if name in m["loss"]]
        head = [m["loss"][name] for r in runs for m in r.metrics[1:2] if name in m["loss"]]
        if tail:  # zoom past the initial model's loss
            ax.set_ylim(min(tail) - 0.05, max(head + tail) + 0.05)
    fig.suptitle("Eval loss at each stage end (band: min-max over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_audit(runs: list[RunView], path: str) -> bool:
    """Per (method, curated stage), first seed: oracle and score z per group, and the selection
    share against the candidate share. False when no run has an audit that prefers anything."""
    panels = []
    for r in list({r.method: r for r in reversed(runs)}.values())[::-1]:
        for k, st in sorted(r.stages.items()):
            rows = st.get("audit")
            if k >= 1 and rows and (any(a["probes"] for a in rows) or any(abs(a["score_mean_z"]) > 1e-12 for a in rows)):
                panels.append((r.method, k, rows))
    if not panels:
        return False
    plt = _plt()
    fig, axes = plt.subplots(len(panels), 2, figsize=(11, 0.32 * max(len(p[2]) for p in panels) * len(panels) + 1.6 * len(panels)),
                             squeeze=False)
    for (method, k, rows), (ax, share_ax) in zip(panels, axes):
        y = np.arange(len(rows))
        score = [a["score_mean_z"] for a in rows]
        ax.barh(y + 0.2, score, height=0.4, xerr=[a["score_se"] or 0 for a in rows], color="#386cb0",
                label="method's score")
        if any(a["probes"] for a in rows):
            oracle = [a["oracle_mean_z"] if a["oracle_mean_z"] is not None else np.nan for a in rows]
            ax.barh(y - 0.2, oracle, height=0.4, xerr=[a["oracle_se"] or 0 for a in rows], color="#bf5b17",
                    label="oracle I(x)")
        ax.set_yticks(y, [f"{a['group']} ({a['probes']} probes)" if a["probes"] else a["group"] for a in rows])
        ax.invert_yaxis()
        ax.axvline(0, color="k", lw=0.8)
        ax.set_xlabel("mean z (lower = preferred), +- standard error")
        ax.set_title(f"{method}, stage {k}: preference by {rows[0]['group_by']}", fontsize=9)
        ax.legend(fontsize=7)
        share_ax.barh(y - 0.2, [100 * a["candidate_share"] for a in rows], height=0.4, color="#bbbbbb", label="candidates")
        share_ax.barh(y + 0.2, [100 * a["selected_share"] for a in rows], height=0.4, color="#1b9e77", label="selected")
        share_ax.set_yticks(y, [a["group"] for a in rows])
        share_ax.invert_yaxis()
        share_ax.set_xlabel("% of samples")
        share_ax.set_title(f"{method}, stage {k}: share of candidates and of the selection", fontsize=9)
        share_ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_sources(runs: list[RunView], path: str) -> None:
    """Per curated stage: the candidates' mix, then each method's selection (first seed of each)."""
    plt = _plt()
    firsts = list({r.method: r for r in reversed(runs)}.values())[::-1]
    stages = sorted({k for r in firsts for k in r.stages if k >= 1})
    if not stages:
        stages = sorted({k for r in firsts for k in r.stages})
    sources = _sources(firsts[0].data)
    fig, axes = plt.subplots(1, len(stages), figsize=(4.5 * len(stages) + 1.5, 0.45 * (len(firsts) + 1) + 1.6),
                             squeeze=False)
    for ax, k in zip(axes[0], stages):
        rows = []
        some = next(r for r in firsts if k in r.stages)
        rows.append(("candidates", _mix(sources, some.stages[k]["selection"]["sample_id"])))
        for r in firsts:
            if k in r.stages:
                sel = r.stages[k]["selection"]
                ids = np.asarray(sel["sample_id"])[np.asarray(sel["selected"])]
                rows.append((r.method, _mix(sources, ids)))
        names = [n for n in SOURCE_COLORS if any(n in m for _, m in rows)] + \
            sorted({n for _, m in rows for n in m} - set(SOURCE_COLORS))
        left = np.zeros(len(rows))
        for name in names:
            share = np.array([m.get(name, 0.0) for _, m in rows]) * 100
            ax.barh(range(len(rows)), share, left=left, color=SOURCE_COLORS.get(name), label=name)
            left += share
        ax.set_yticks(range(len(rows)), [label for label, _ in rows])
        ax.invert_yaxis()
        ax.set_xlim(0, 100)
        ax.set_xlabel("% of samples")
        ax.set_title(f"stage {k}: source mix")
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_influence(runs: list[RunView], path: str) -> bool:
    """Predicted vs oracle influence per (method, stage) with probes; False when no run has any."""
    panels = []
    for r in list({r.method: r for r in reversed(runs)}.values())[::-1]:
        for k, st in sorted(r.stages.items()):
            if st["probes"] and st["scores"]:
                pred = dict(zip(st["scores"]["sample_id"], st["scores"]["prediction"]))
                pairs = [(i, pred[s]) for s, i in zip(st["probes"]["sample_id"], st["probes"]["influence"]) if s in pred]
                if len(pairs) >= 3:
                    held = st["marker"].get("curation/influence/val_spearman")
                    panels.append((r.method, k, np.array(pairs), held))
    if not panels:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.8), squeeze=False)
    for ax, (method, k, pairs, held) in zip(axes[0], panels):
        rho = spearman(pairs[:, 0], pairs[:, 1])
        ax.scatter(pairs[:, 0], pairs[:, 1], s=6, alpha=0.5)
        ax.set_xlabel("oracle influence I(x)")
        ax.set_ylabel("predicted (z-scored)")
        extra = f", held-out {held:.2f}" if isinstance(held, (int, float)) else ""
        ax.set_title(f"{method}, stage {k}: Spearman {rho:.2f}{extra}", fontsize=9)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_clusters(runs: list[RunView], path: str) -> bool:
    """Candidates, selected samples and stream proportion per cluster (the first clustered run)."""
    run = next((r for r in runs if any(st["scores"] and max(st["scores"]["cluster"]) >= 0
                                       for st in r.stages.values())), None)
    if run is None:
        return False
    stages = [k for k, st in sorted(run.stages.items()) if st["scores"] and max(st["scores"]["cluster"]) >= 0]
    plt = _plt()
    fig, axes = plt.subplots(1, len(stages), figsize=(5 * len(stages), 3.6), squeeze=False)
    for ax, k in zip(axes[0], stages):
        st = run.stages[k]
        clusters = np.asarray(st["scores"]["cluster"])
        cluster_of = dict(zip(st["scores"]["sample_id"], clusters))
        sel = st["selection"]
        chosen = [cluster_of[s] for s, keep in zip(sel["sample_id"], sel["selected"]) if keep]
        weight = {}
        for s, keep, w in zip(sel["sample_id"], sel["selected"], sel["weight"]):
            if keep:
                weight[cluster_of[s]] = w
        ids = np.arange(clusters.max() + 1)
        ax.bar(ids - 0.2, np.bincount(clusters, minlength=len(ids)), width=0.4, label="candidates")
        ax.bar(ids + 0.2, np.bincount(chosen, minlength=len(ids)), width=0.4, label="selected")
        twin = ax.twinx()
        twin.plot(ids, [weight.get(i, 0.0) for i in ids], "k.", label="stream proportion")
        twin.set_ylabel("stream proportion")
        ax.set_xlabel("cluster")
        ax.set_ylabel("samples")
        ax.set_title(f"{run.method}, stage {k}: clusters")
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


PHASE_COLORS = {"probe": "#1b9e77", "embed": "#d95f02", "fit": "#7570b3", "score": "#e7298a",
                "cluster": "#66a61e", "select": "#e6ab02", "index": "#a6761d", "other": "#999999"}


def plot_costs(runs: list[RunView], path: str) -> bool:
    """Per (method, curated stage): stacked curation seconds per phase, and training seconds."""
    from schemas.costs import PHASES, stage_costs

    bars = []
    for r in list({r.method: r for r in reversed(runs)}.values())[::-1]:
        train = {m["stage"]: m["train_seconds"] for m in r.metrics}
        for k, st in sorted(r.stages.items()):
            if k >= 1:
                bars.append((f"{r.method}\nstage {k}", stage_costs(st["marker"]), train.get(k, 0.0)))
    if not bars:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(bars) + 2.5), 4.2))
    x = np.arange(len(bars))
    bottom = np.zeros(len(bars))
    for phase in PHASES:
        seconds = np.array([c[phase] for _, c, _ in bars])
        ax.bar(x - 0.2, seconds, width=0.38, bottom=bottom, color=PHASE_COLORS[phase], label=phase)
        bottom += seconds
    ax.bar(x + 0.2, [t for _, _, t in bars], width=0.38, color="white", edgecolor="#333", hatch="//",
           label="training")
    for i, (_, c, t) in enumerate(bars):
        if t > 0:
            ax.text(i - 0.2, bottom[i], f"{c['total'] / t:.2f}x", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, [label for label, _, _ in bars], fontsize=8)
    ax.set_ylabel("seconds")
    ax.set_title("Curation per phase (left, share of training on top) vs the stage's training (right)", fontsize=9)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------- the page
def _markdown_table_html(text: str) -> str:
    rows = [line for line in text.splitlines() if line.startswith("|") and "---" not in line]
    if not rows:
        return ""
    cells = [[html.escape(c.strip()) for c in line.strip("|").split("|")] for line in rows]
    head = "".join(f"<th>{c}</th>" for c in cells[0])
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in cells[1:])
    return f"<table><tr>{head}</tr>{body}</table>"


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
th{{background:#f3f3f3}}td:first-child{{text-align:left}}img{{max-width:100%}}figure{{margin:1.5em 0}}
figcaption{{color:#555;font-size:90%}}</style></head>
<body><h1>{title}</h1>{body}</body></html>
"""


def _share(metrics_row: dict) -> str:
    train = metrics_row["train_seconds"]
    return f"{metrics_row['curation_seconds'] / train:.2f}x" if train > 0 else "-"


def _runs_of(source: str) -> tuple[list[RunView], str, str]:
    """(runs, title, intro HTML) of a compare folder or of one run."""
    store = store_for(source)
    if store.exists("comparison.json"):
        import pyarrow.parquet as pq

        doc = json.loads(store.read_bytes("comparison.json"))
        table = pq.read_table(os.path.join(source, "runs.parquet")).to_pylist()
        table = list({(r["method"], r["seed"]): r for r in table}.values())  # one row per run and eval set
        runs = []
        for row in sorted(table, key=lambda r: (doc["methods"].index(r["method"]), r["seed"])):
            runs.append(load_run(row["run"]))
            runs[-1].method = row["method"]  # the comparison's entry (e.g. mates@frozen), not only the method
        text = store.read_bytes("comparison.md").decode()
        verdicts = "".join(f"<li>{html.escape(v[2:])}</li>" for v in text.splitlines() if v.startswith("- "))
        intro = (f"<p>Command: <code>{html.escape(doc['command'])}</code></p>{_markdown_table_html(text)}"
                 f"<ul>{verdicts}</ul>")
        return runs, "mates comparison", intro
    run = load_run(source)
    names = list(run.kinds)
    rows = "".join(f"<tr><td>{m['stage']}</td><td>{m['tokens_seen']:,}</td>"
                   + "".join(f"<td>{m['loss'].get(n, float('nan')):.4f}</td>" for n in names)
                   + f"<td>{m['curation_seconds']:.1f}</td><td>{m['train_seconds']:.1f}</td><td>{_share(m)}</td></tr>"
                   for m in run.metrics)
    heads = "".join(f"<th>{html.escape(n)} ({run.kinds[n]})</th>" for n in names)
    intro = (f"<p>Run <code>{html.escape(source)}</code>, method <b>{html.escape(run.method)}</b>, seed {run.seed}.</p>"
             f"<table><tr><th>stage</th><th>tokens</th>{heads}<th>curation s</th><th>training s</th>"
             f"<th>curation / training</th></tr>{rows}</table>")
    return [run], f"mates run: {run.method}", intro


def write_report(source: str, out: str | None = None, log=print) -> str:
    """Write `<out>/index.html` and its PNGs; returns the HTML path."""
    source = source.rstrip("/")
    out = out or (os.path.join(source, "report") if "://" not in source else None)
    if out is None or "://" in out:
        raise MatesError("`--out` must be a local folder (the report is a page and its images).")
    runs, title, intro = _runs_of(source)
    if not runs:
        raise MatesError(f"`{source}` holds no finished run to report on.")
    os.makedirs(out, exist_ok=True)
    figures = [("loss.png", "Loss on every eval set at the end of each stage (lm: every token; cloze: "
                "the target word only).", plot_loss)]
    figures.append(("sources.png", "Source mix of each curated stage: the candidates, then what each "
                    "method selected (first seed).", plot_sources))
    figures.append(("audit.png", "What each curated stage preferred, per catalog group: z-scored oracle "
                    "influence and method score (lower = preferred), and the selection's share.", plot_audit))
    figures.append(("influence.png", "Predicted vs oracle influence of the probed candidates.", plot_influence))
    figures.append(("clusters.png", "Group-MATES clusters: candidates, selected samples and stream proportion.",
                    plot_clusters))
    figures.append(("costs.png", "Curation seconds per phase at each boundary (embed: new embeddings only) "
                    "next to the stage's training seconds.", plot_costs))
    body = [intro]
    for name, caption, plot in figures:
        path = os.path.join(out, name)
        if plot(runs, path) is False:
            continue
        body.append(f'<figure><img src="{name}" alt="{html.escape(caption)}"><figcaption>'
                    f"{html.escape(caption)}</figcaption></figure>")
        log(f"report: {path}")
    page = os.path.join(out, "index.html")
    with open(page, "w", encoding="utf-8") as handle:
        handle.write(PAGE.format(title=html.escape(title), body="\n".join(body)))
    return page
