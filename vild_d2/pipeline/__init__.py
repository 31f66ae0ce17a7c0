"""The demo's orchestration: every stage of the method on the embedded world (or VOC), run as the
same tools/train_net.py and tools/precompute_clip_embeddings.py commands a user would type."""
