"""The verdicts of `mates compare`: each target of issues 13 and 25, said as met or MISSED with
its numbers, from the summary `compare_tables.summarize` makes; and the names of its entries."""
from __future__ import annotations

import numpy as np

NO_INTERACTION = "-no-interaction"  # a group_mates entry's suffix: the same run, the greedy's relational term off
STATIC = ("dsir", "classifier")  # the static targeting baselines
SPEARMAN_TARGET = 0.6            # the influence model's cross-validated Spearman, at every boundary
BOUNDARY_SHARE_TARGET = 0.25     # a boundary's curation seconds over its stage's training seconds


def split_entry(entry: str) -> tuple[str, str, bool]:
    """(method, backbone or "", interaction) of an entry `METHOD[@BACKBONE][-no-interaction]`."""
    interaction = not entry.endswith(NO_INTERACTION)
    method, _, backbone = entry.removesuffix(NO_INTERACTION).partition("@")
    return method, backbone, interaction


def model_aware(entries) -> list[str]:
    return [e for e in entries if split_entry(e)[0] in ("mates", "group_mates")]


def _on_common_seeds(by: dict, a: str, b: str) -> tuple[list[int], float, float] | None:
    """(seeds both finished, a's and b's mean primary loss on them): a seed moves every method alike."""
    seeds = sorted(set(by[a]["primary_by_seed"]) & set(by[b]["primary_by_seed"]))
    if not seeds:
        return None
    return seeds, *(float(np.mean([by[e]["primary_by_seed"][k] for k in seeds])) for e in (a, b))


def _pair_verdicts(by: dict) -> list[str]:
    """Group-MATES against MATES (better by more than MATES' seed std), the interaction term's
    contribution (the same entry without it), and mates against mates@oracle."""
    out = []
    for group, single in (("group_mates", "mates"), ("group_mates@frozen", "mates@frozen")):
        if group not in by or single not in by:
            continue
        common = _on_common_seeds(by, group, single)
        if common is None:
            out.append(f"{group} vs {single}: not judged yet (no seed finished by both).")
            continue
        seeds, gm, m = common
        std = by[single]["loss"][by[single]["primary"]][1]
        out.append(f"{group} {gm:.4f} vs {single} {m:.4f} on the {len(seeds)} seed(s) both finished: better by "
                   f"{m - gm:+.4f}; target > {single}'s seed std {std:.4f}: {'met' if m - gm > std else 'MISSED'}.")
    for group in ("group_mates", "group_mates@frozen"):
        off = group + NO_INTERACTION
        if group in by and off in by and (common := _on_common_seeds(by, group, off)) is not None:
            seeds, with_, without = common
            per_seed = ", ".join(f"{by[off]['primary_by_seed'][k] - by[group]['primary_by_seed'][k]:+.4f}"
                                 for k in seeds)
            out.append(f"{group}'s interaction term: {with_:.4f} with it, {without:.4f} without ({off}) on "
                       f"{len(seeds)} seed(s): it lowers the loss by {without - with_:+.4f} (per seed {per_seed}); "
                       f"{group}'s seed std {by[group]['loss'][by[group]['primary']][1]:.4f}.")
    if "mates" in by and "mates@oracle" in by and (common := _on_common_seeds(by, "mates", "mates@oracle")):
        seeds, m, o = common
        out.append(f"mates {m:.4f} vs mates@oracle {o:.4f} (the oracle scoring every candidate) on {len(seeds)} "
                   f"seed(s): mates is {'better' if m < o else 'worse'} by {abs(o - m):.4f}.")
    return out


def verdicts(summary: list[dict], off_target: list[str] = ()) -> list[str]:
    """The comparison's targets (issues 13 and 25), each said as met or MISSED with its numbers.
    `off_target`: eval sets of no target's domain (general English), where MATES should not lose."""
    by = {s["method"]: s for s in summary}
    if "random" not in by:
        return []
    primary = by["random"]["primary"]
    rc, rs = by["random"]["loss"][primary]
    loss = lambda m, e=primary: by[m]["loss"][e]  # noqa: E731  (mean, std)
    aware = model_aware(by)
    out = []
    for m in aware:
        gain = rc - loss(m)[0]
        judged = ("not judged yet (random has one seed: no std)" if by["random"]["seeds"] < 2 else
                  "met" if gain > 2 * rs else "MISSED")
        out.append(f"{m} vs random on {primary}: final loss lower by {gain:+.4f}; target > 2 x random's seed "
                   f"std = {2 * rs:.4f}: {judged}.")
    out += _pair_verdicts(by)
    statics = [b for b in STATIC if b in by]
    if statics:
        best = min(statics, key=lambda b: loss(b)[0])
        (bc, bs) = loss(best)
        for m in (m for m in ("mates", "mates@frozen") if m in by):
            out.append(f"{m} {loss(m)[0]:.4f} vs the best static baseline ({best}) {bc:.4f} + 1 std {bs:.4f} on "
                       f"{primary}: {'met' if loss(m)[0] <= bc + bs else 'MISSED'}.")
            for e in (e for e in off_target if e in by[m]["loss"] and e in by[best]["loss"]):
                mo, bo = loss(m, e)[0], loss(best, e)[0]
                out.append(f"{m} {mo:.4f} vs {best} {bo:.4f} on the off-target {e}: "
                           f"{'met' if mo < bo else 'MISSED'} (better than it).")
    for m in (m for m in ("mates", "mates@frozen") if m in by):
        share = by[m]["token_share"]
        ok = share is not None and by[m]["reached"] == by[m]["seeds"] and share[0] <= 0.5
        said = "never reached" if share is None else f"{100 * share[0]:.0f}% of random's curated-stage tokens"
        out.append(f"{m} reaches random's final {primary} loss with {said}; target <= 50%: "
                   f"{'met' if ok else 'MISSED'}.")
    for m in aware:
        flops, seconds = by[m].get("flops_share"), by[m].get("seconds_share")
        if flops is None and seconds is None:
            continue
        said = "; ".join(f"{100 * v[0]:.0f}% of random's curated-stage {unit}" for unit, v in
                         (("FLOPs", flops), ("seconds", seconds)) if v is not None)
        ok = flops is not None and seconds is not None and max(flops[0], seconds[0]) <= 0.5
        worst = by[m].get("boundary_share_max")
        per_boundary = "" if worst is None else (
            f"; its costliest boundary's curation is {worst:.2f}x that stage's training, target <= "
            f"{BOUNDARY_SHARE_TARGET}x: {'met' if worst <= BOUNDARY_SHARE_TARGET else 'MISSED'}")
        out.append(f"{m} reaches random's final {primary} loss with {said} (training + curation); target <= 50%: "
                   f"{'met' if ok else 'MISSED'}{per_boundary}.")
    for m in (m for m in aware if by[m].get("influence_spearman")):
        mean, low = by[m]["influence_spearman"]
        cv = by[m].get("influence_cv_spearman")
        judged, kind = (cv[1], "cross-validated") if cv else (low, "held-out (no cross-validation for this backbone)")
        cv_said = f"; 5-fold cross-validated {cv[0]:.2f} on average, {cv[1]:.2f} at its worst" if cv else ""
        out.append(f"{m}: influence model held-out Spearman {mean:.2f} on average, {low:.2f} at its worst boundary"
                   f"{cv_said}; target >= {SPEARMAN_TARGET} at every boundary, judged on the {kind} figure: "
                   f"{'met' if judged >= SPEARMAN_TARGET else 'MISSED'}.")
    return out
