-- Exact-duplicate removal (DESIGN.md 2.4): candidates whose text slices are identical share a
-- `text_sha1` in the catalog; keep the one of lowest predicted influence (ties: lowest sample_id).
-- Views: scores (sample_id, prediction, ...), catalog (sample_id, text_sha1).
-- Each kept row also says how many candidates shared its hash (`copies`; 1 = no duplicate).
SELECT s.*, c.text_sha1,
       count(*) OVER (PARTITION BY c.text_sha1) AS copies
FROM scores AS s
JOIN catalog AS c USING (sample_id)
QUALIFY row_number() OVER (PARTITION BY c.text_sha1 ORDER BY s.prediction, s.sample_id) = 1
ORDER BY s.sample_id;
