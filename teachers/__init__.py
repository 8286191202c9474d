"""Teacher role: named scoring services that return the teacher log-probs of the
student's sampled tokens (prefill-only requests over SGLang's HTTP API)."""
