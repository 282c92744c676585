-- The selection manifest (schemas.tables.SELECTION, DESIGN.md 2.5): every candidate once, its
-- cluster's bucket 'c%03d', the bucket's stream weight (its share of the selected samples; 0 for a
-- cluster with nothing selected) and whether it is selected.
-- View: picked (sample_id, cluster, selected). Rows of cluster -1 (dropped before clustering,
-- e.g. duplicates) belong to no bucket: bucket '' and weight 0.
SELECT sample_id,
       CASE WHEN cluster >= 0 THEN printf('c%03d', cluster) ELSE '' END AS bucket,
       CASE WHEN cluster >= 0
            THEN coalesce(sum(selected::BIGINT) OVER (PARTITION BY cluster)::DOUBLE
                          / nullif(sum(selected::BIGINT) OVER (), 0), 0.0)
            ELSE 0.0
       END AS weight,
       selected
FROM picked
ORDER BY sample_id;
