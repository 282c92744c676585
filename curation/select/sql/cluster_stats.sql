-- Per-cluster statistics of one stage's scored candidates (DESIGN.md 2.4).
-- Views: scores (sample_id, prediction, cluster), catalog (sample_id, source).
-- One row per cluster: its size, predicted influence (lower is better) and source mix,
-- the mix as a list of {source, n, share}, largest first.
WITH joined AS (
    SELECT s.cluster, s.prediction, c.source
    FROM scores AS s
    JOIN catalog AS c USING (sample_id)
),
per_source AS (
    SELECT cluster, source, count(*) AS n,
           count(*) / sum(count(*)) OVER (PARTITION BY cluster) AS share
    FROM joined
    GROUP BY cluster, source
),
mix AS (
    SELECT cluster,
           list({'source': source, 'n': n, 'share': share} ORDER BY n DESC, source) AS sources
    FROM per_source
    GROUP BY cluster
),
summary AS (
    SELECT cluster,
           count(*) AS size,
           avg(prediction) AS mean_prediction,
           stddev_pop(prediction) AS std_prediction,
           min(prediction) AS min_prediction,
           max(prediction) AS max_prediction,
           count(DISTINCT source) AS n_sources
    FROM joined
    GROUP BY cluster
)
SELECT summary.*, mix.sources
FROM summary
JOIN mix USING (cluster)
ORDER BY cluster;
