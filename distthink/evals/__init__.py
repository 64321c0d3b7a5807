"""Offline evaluation metrics (captioning). Recommendation metrics live in distthink.recsys.metrics."""
