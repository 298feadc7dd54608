"""Dense decoders only (SEAP): the dense family table, activation statistics, head and channel scores
(SEAP, Wanda-sp, FLAP), layer schedules, structured plans, sliced export and selective loading."""
