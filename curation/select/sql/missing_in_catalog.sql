-- Candidates whose sample_id the catalog lacks (a join would silently drop them).
-- Views: scores (sample_id), catalog (sample_id).
SELECT count(*) AS missing, min(sample_id) AS example
FROM scores
ANTI JOIN catalog USING (sample_id);
