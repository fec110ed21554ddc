"""Encoder service: open_clip text and image embeddings over gRPC, with dynamic batching."""
