"""Getting text into the pool: packaged sources, the demo corpus, readers, tokenizer, ingest."""
