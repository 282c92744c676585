# The comparison re-run of issue 25, as README "Comparison" says (run from /work/cmp).
# Resumable: the same command runs only what is missing.
set -e
cd /work/cmp
M=/work/main/.venv/bin/mates
[ -f corpus/corpus.jsonl ] || $M demo-corpus corpus --seed 17
[ -f data/_SUCCESS ] || $M ingest --input corpus/corpus.jsonl --data data --recipe bench \
    --target wiki_en=corpus/targets/wiki_en.jsonl --target wiki_en_cloze=corpus/targets/wiki_en_cloze.jsonl \
    --eval wiki_en=corpus/eval/wiki_en.jsonl --eval wiki_en_cloze=corpus/eval/wiki_en_cloze.jsonl \
    --eval bbc_en=corpus/eval/bbc_en.jsonl
$M compare bench --set data=data --seeds 3 --jobs 2 --out cmp \
    --methods random,perplexity,dsir,classifier,mates,mates@frozen,mates@ngram,mates@oracle,group_mates,group_mates@frozen
