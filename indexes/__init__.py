"""Vector storage and search: LanceDB store, FAISS indexes, manifests. numpy, faiss, lancedb only."""
