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

from schemas.errors import MatesError
from schemas.storage import store_for
from training.report_plots import (plot_audit, plot_clusters, plot_compute, plot_costs, plot_influence, plot_loss,
                                   plot_sources)
from training.report_runs import RunView, comparison_rows, load_run, view_from_tables


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
        table = rows_all = pq.read_table(os.path.join(source, "runs.parquet")).to_pylist()
        table = list({(r["method"], r["seed"]): r for r in table}.values())  # one row per run and eval set
        runs, gone, committed = [], [], None
        for row in sorted(table, key=lambda r: (doc["methods"].index(r["method"]), r["seed"])):
            if store_for(row["run"]).exists("recipe.yaml"):
                runs.append(load_run(row["run"]))
            else:   # its folder is gone (a committed comparison): what the tables hold of it
                gone.append(row)
                committed = committed or comparison_rows(source)   # read once, for every such run
                runs.append(view_from_tables(committed, row["method"], row["seed"], data="", url=source))
            runs[-1].method = row["method"]  # the comparison's entry (e.g. mates@frozen), not only the method
            runs[-1].primary = runs[-1].primary or next((r["eval_set"] for r in rows_all if r["primary"]), None)
        data = next((r.data for r in runs if not r.from_tables), "")
        for r in runs:
            r.data = r.data or data
        text = store.read_bytes("comparison.md").decode()
        verdicts = "".join(f"<li>{html.escape(v[2:])}</li>" for v in text.splitlines() if v.startswith("- "))
        note = "" if not gone else (
            f"<p>{len(gone)} run(s) have no folder here: their loss, compute and source mix come from the "
            f"comparison's tables; the probe, cluster and per-phase plots show the runs that have one.</p>")
        intro = (f"<p>Command: <code>{html.escape(doc['command'])}</code></p>{note}{_markdown_table_html(text)}"
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
    figures.append(("compute.png", "Primary eval loss against cumulative compute, training plus curation "
                    "(README \"Compute ledger\"), in FLOPs and in seconds.", plot_compute))
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
