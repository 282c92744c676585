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
    SELECT *,
           CASE WHEN $mode = 'size' THEN size::DOUBLE
                -- shifted by the best mean so exp() cannot overflow; floored so that no weight is
                -- exactly 0 (a budget larger than the favoured clusters still has somewhere to go)
                ELSE size * greatest(exp(-(mean_prediction - min(mean_prediction) OVER ()) / $temperature),
                                     1e-200)
           END AS weight
    FROM stats
),
-- Water-filling: a cluster fills up at level size / weight. In that order, if the clusters before
-- row j are full and the rest share what is left, their level is level_if_open; the first row
-- whose level_if_open does not exceed its own fill level gives the level of every open cluster.
levels AS (
    SELECT *,
           size / weight AS fill_level,
           ($budget - coalesce(sum(size) OVER before_row, 0)) / sum(weight) OVER from_row AS level_if_open
    FROM weighted
    WINDOW before_row AS (ORDER BY size / weight, cluster ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING),
           from_row AS (ORDER BY size / weight, cluster ROWS BETWEEN CURRENT ROW AND UNBOUNDED FOLLOWING)
),
water AS (
    -- no such row only when every cluster is full ($budget = all rows): level +infinity
    SELECT coalesce((SELECT level_if_open FROM levels
                     WHERE level_if_open <= fill_level
                     ORDER BY fill_level, cluster
                     LIMIT 1), 'infinity'::DOUBLE) AS level
),
exact AS (
    SELECT cluster, size, mean_prediction, weight,
           least(size::DOUBLE, weight * water.level) AS exact_quota
    FROM levels, water
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
SELECT cluster, size, mean_prediction, weight, exact_quota,
       floor_quota + (remainder_rank <= leftover AND floor_quota < size)::BIGINT AS quota
FROM ranked
ORDER BY cluster;
