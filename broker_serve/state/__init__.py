"""The cluster's control state in Redis: the store and its records, liveness, and status views."""
