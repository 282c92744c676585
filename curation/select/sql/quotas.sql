-- Per-cluster quotas that sum exactly to $budget and never exceed a cluster's size (DESIGN.md 2.4).
-- View: scores (cluster, prediction). Parameters:
--   $budget       samples to select in this stage (0 <= $budget <= rows of scores)
--   $mode         'size':      share proportional to the cluster's size
--                 'influence': share proportional to size * softmax(-mean prediction / $temperature),
--                              so clusters of lower (better) predicted influence get more
--   $temperature  > 0; only read in 'influence' mode
-- The exact shares are water-filled under the cap quota <= size (a full cluster's excess goes to
-- the others in proportion to their weights), then rounded by largest remainder.
WITH stats AS (
    SELECT cluster, count(*) AS size, avg(prediction) AS mean_prediction
    FROM scores
    GROUP BY cluster
),
weighted AS (
    -- log of the weight; only differences of log weights are ever exponentiated, so a small
    -- temperature cannot overflow or flush the weights of the open clusters to zero
    SELECT *, ln(size) - CASE WHEN $mode = 'size' THEN 0.0 ELSE mean_prediction / $temperature END AS log_weight
    FROM stats
),
ordered AS (
    -- a cluster fills up at level size / weight: in that order (best mean first), the clusters
    -- before row j hold full_before samples when row j is the first one left open
    SELECT *,
           row_number() OVER fill AS fill_rank,
           coalesce(sum(size) OVER (fill ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS full_before
    FROM weighted
    WINDOW fill AS (ORDER BY ln(size) - log_weight, cluster)
),
open_from AS (
    -- row j's own share if the rows before it are full and it and every later row share what is
    -- left in proportion to their weights (taken relative to row j's weight); O(clusters^2) pairs
    SELECT j.fill_rank, j.size, j.log_weight,
           ($budget - j.full_before) / sum(exp(i.log_weight - j.log_weight)) AS own_share
    FROM ordered AS j
    JOIN ordered AS i ON i.fill_rank >= j.fill_rank
    GROUP BY j.fill_rank, j.size, j.log_weight, j.full_before
),
first_open AS (
    -- the first row whose share fits: it and every later row stay open, all earlier rows are full
    -- (no such row only when $budget is every row: then all are full)
    SELECT fill_rank, log_weight, own_share
    FROM open_from
    WHERE own_share <= size
    ORDER BY fill_rank
    LIMIT 1
),
exact AS (
    SELECT o.cluster, o.size, o.mean_prediction, o.log_weight,
           CASE WHEN p.fill_rank IS NULL OR o.fill_rank < p.fill_rank THEN o.size::DOUBLE
                ELSE least(o.size::DOUBLE, p.own_share * exp(o.log_weight - p.log_weight))
           END AS exact_quota
    FROM ordered AS o
    LEFT JOIN first_open AS p ON true
),
ranked AS (
    SELECT *,
           floor(exact_quota)::BIGINT AS floor_quota,
           $budget - sum(floor(exact_quota)::BIGINT) OVER () AS leftover,
           -- largest remainders first, among clusters that still have room
           row_number() OVER (ORDER BY floor(exact_quota) < size DESC,
                                       exact_quota - floor(exact_quota) DESC,
                                       cluster) AS remainder_rank
    FROM exact
)
SELECT cluster, size, mean_prediction, log_weight, exact_quota,
       floor_quota + (remainder_rank <= leftover AND floor_quota < size)::BIGINT AS quota
FROM ranked
ORDER BY cluster;
