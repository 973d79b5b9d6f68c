"""Background workers driven by the data manager's lists: pull (replicate) and trash."""
