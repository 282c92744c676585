# The comparison of issue 25, as README "Comparison" says (run from /work/cmp, 2 cores).
# Resumable: the same command runs only what is missing.
set -e
cd /work/cmp
M=/work/main/.venv/bin/mates
[ -f corpus/corpus.jsonl ] || $M demo-corpus corpus --seed 17
[ -f data/_SUCCESS ] || $M ingest --input corpus/corpus.jsonl --data data --recipe bench \
    --target wiki_en=corpus/targets/wiki_en.jsonl --target wiki_en_cloze=corpus/targets/wiki_en_cloze.jsonl \
    --eval wiki_en=corpus/eval/wiki_en.jsonl --eval wiki_en_cloze=corpus/eval/wiki_en_cloze.jsonl \
    --eval bbc_en=corpus/eval/bbc_en.jsonl
# 2026-12-04: ten entries (30 runs, 79 min); its tables are commit 4dbfe84's training/results/bench-rerun
$M compare bench --set data=data --seeds 3 --jobs 2 --out cmp \
    --methods random,perplexity,dsir,classifier,mates,mates@frozen,mates@ngram,mates@oracle,group_mates,group_mates@frozen
# 2026-12-05: the frozen entries again, each run with its own embedding store, and the interaction-off entry (27 min)
$M compare bench --set data=data --seeds 3 --jobs 2 --out cmp2 \
    --methods random,mates@frozen,group_mates@frozen,group_mates@frozen-no-interaction
# the table: cmp2's runs first, the rest from the first comparison's tables (cmp/, or 4dbfe84's files)
$M compare bench --set data=data --seeds 3 --out cmp2 --table-only --from cmp \
    --methods random,perplexity,dsir,classifier,mates,mates@frozen,mates@ngram,mates@oracle,group_mates,group_mates@frozen,group_mates@frozen-no-interaction
$M report cmp2 --out cmp2/report      # loss, sources, compute and costs PNGs copied here
