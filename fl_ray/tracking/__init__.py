"""Tracking: events, writers, the sender, the spool and the hub the receiver actor runs."""
