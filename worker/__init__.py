"""spindle worker: pulls jobs from Redis, runs them on an engine, publishes tokens back."""
