"""Lightning callbacks of headprune (head pruning, pruning reports)."""
