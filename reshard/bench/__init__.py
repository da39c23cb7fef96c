"""``reshard bench``: load-time measurements in fresh processes, their table and plot."""
