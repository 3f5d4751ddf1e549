"""Retention and expiry: per-partition policies, legal holds, delayed deletion with a restore window."""
