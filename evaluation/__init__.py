"""Re-ID and face-verification evaluation: functional cores, a FAISS search back end, PML adapters."""
