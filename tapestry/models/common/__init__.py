"""Pieces every model family shares: flow matching, guidance, norms, positions, embeddings."""
