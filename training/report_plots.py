"""The plots of `mates report`, one function per PNG (what each shows: training/report.py)."""
from __future__ import annotations

import numpy as np

from curation.influence.fitting import spearman
from training.report_runs import RunView, source_mix, sources_of

SOURCE_COLORS = {"wiki_en": "#1b9e77", "wiki_fr": "#7fc97f", "wiki_es": "#beaed4", "bbc_news": "#386cb0",
                 "near_dup": "#fdc086", "spam": "#f0027f", "char_noise": "#bf5b17", "shuffled": "#666666"}


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
        for i, method in enumerate(dict.fromkeys(r.method for r in runs)):
            mine = [r for r in runs if r.method == method and r.metrics]
            if not mine:
                continue
            n = min(len(r.metrics) for r in mine)
            tokens = np.mean([[m["tokens_seen"] for m in r.metrics[:n]] for r in mine], axis=0) / 1e6
            loss = np.array([[m["loss"].get(name, np.nan) for m in r.metrics[:n]] for r in mine])  # [seeds, points]
            line, = ax.plot(tokens, loss.mean(0), marker="o", color=_color(i),
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


def _audit_mix(stage: dict, key: str) -> dict[str, float]:
    """A stage's source mix from its audit rows (`candidate_share` or `selected_share`)."""
    return {a["group"]: a[key] for a in stage.get("audit") or [] if a["group_by"] == "source"}


def plot_sources(runs: list[RunView], path: str) -> None:
    """Per curated stage: the candidates' mix, then each method's selection (first seed of each);
    from the selection and the catalog, or from the stage audit of a run rebuilt from tables."""
    plt = _plt()
    firsts = list({r.method: r for r in reversed(runs)}.values())[::-1]
    stages = sorted({k for r in firsts for k in r.stages if k >= 1})
    if not stages:
        stages = sorted({k for r in firsts for k in r.stages})
    with_folders = [r for r in firsts if not r.from_tables]
    sources = sources_of(with_folders[0].data) if with_folders else None

    def mix(stage: dict, key: str) -> dict[str, float]:
        if stage.get("selection") is None:
            return _audit_mix(stage, key)
        sel = stage["selection"]
        ids = sel["sample_id"] if key == "candidate_share" else np.asarray(sel["sample_id"])[np.asarray(sel["selected"])]
        return source_mix(sources, ids)

    fig, axes = plt.subplots(1, len(stages), figsize=(4.5 * len(stages) + 1.5, 0.45 * (len(firsts) + 1) + 1.6),
                             squeeze=False)
    for ax, k in zip(axes[0], stages):
        rows = [("candidates", next((m for r in firsts if k in r.stages and (m := mix(r.stages[k], "candidate_share"))),
                                    {}))]
        rows += [(r.method, m) for r in firsts if k in r.stages and (m := mix(r.stages[k], "selected_share"))]
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
    for r in list({r.method: r for r in reversed(runs) if not r.from_tables}.values())[::-1]:   # phases: run folders
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
    ax.set_xticks(x, [label.replace("-no-interaction", "\n-no-interaction") for label, _, _ in bars], fontsize=7)
    ax.set_ylabel("seconds")
    ax.set_title("Curation per phase (left, share of training on top) vs the stage's training (right)", fontsize=9)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _color(i: int):
    """The i-th method's colour: matplotlib's 10 defaults, then tab20's lighter half (11 entries
    of a comparison would otherwise share C0)."""
    if i < 10:
        return f"C{i}"
    import matplotlib

    return matplotlib.colormaps["tab20"](2 * (i - 10) % 20 + 1)


def cumulative_compute(run: RunView) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray] | None:
    """(FLOPs, seconds, stage) at the end of each stage from stage 0 on: training plus the
    curation of every boundary so far (the ledger: `train_flops`, each marker's `curation_flops`
    and `curation_seconds`). A unit is None where a stage lacks it (a run written before the
    ledger, or rebuilt from tables written before `curation_flops` was kept); None when both are."""
    from schemas.costs import stage_compute

    rows = [m for m in run.metrics if m["stage"] >= 0]
    costs = [stage_compute(m, run.stages.get(m["stage"], {}).get("marker", {})) for m in rows]
    if not rows:
        return None
    units = [None if any(c[i] is None for c in costs) else np.cumsum([c[i] for c in costs]) for i in (0, 1)]
    if units[0] is None and units[1] is None:
        return None
    return units[0], units[1], np.array([m["stage"] for m in rows])


def plot_compute(runs: list[RunView], path: str) -> bool:
    """The primary eval loss against cumulative compute (training + curation), in FLOPs and in
    seconds: one line per run, so a method that reaches a loss with less compute lies left."""
    lines = [(r, c) for r in runs if (c := cumulative_compute(r)) is not None and r.primary]
    if not lines:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {}
    for r, (flops, seconds, stages) in lines:
        by_stage = {m["stage"]: m["loss"].get(r.primary, np.nan) for m in r.metrics}
        loss = [by_stage[k] for k in stages]
        color = colors.setdefault(r.method, _color(len(colors)))
        for ax, x in zip(axes, (flops, seconds)):
            if x is None:
                continue
            seen = {h.get_label() for h in ax.get_lines()}   # one legend entry per method and panel
            ax.plot(x, loss, marker="o", color=color, alpha=0.8, label=None if r.method in seen else r.method)
    for ax, unit in zip(axes, ("FLOPs (training + curation)", "seconds (training + curation)")):
        ax.set_xlabel(f"cumulative {unit}")
        ax.set_ylabel(f"loss on {lines[0][0].primary}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].ticklabel_format(axis="x", style="sci", scilimits=(0, 0))  # one exponent, no crowded labels
    fig.suptitle("Primary eval loss against the compute spent so far (one line per run)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
