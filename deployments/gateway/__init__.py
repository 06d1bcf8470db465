"""The gateway: API keys, per-key model access, rate limits, CORS and Host checks."""
