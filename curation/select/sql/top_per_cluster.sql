-- Non-relational baseline of the per-cluster greedy: the `quota` lowest predictions of each
-- cluster (ties: lowest sample_id). Views: scores (sample_id, prediction, cluster),
-- quotas (cluster, quota).
SELECT s.sample_id, s.cluster, s.prediction
FROM scores AS s
JOIN quotas AS q USING (cluster)
QUALIFY row_number() OVER (PARTITION BY s.cluster ORDER BY s.prediction, s.sample_id) <= q.quota
ORDER BY s.sample_id;
