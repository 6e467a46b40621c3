"""The request path every dialect shares: adapt → prepare (check, canonicalize) → admit → answer (sync or streamed)."""
