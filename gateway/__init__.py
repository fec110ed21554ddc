"""Gateway: the public search API over the encoder, the index shards and object storage."""
