"""Mixture-of-Experts only (PreMoe): the family table, routing, expert scorers, expert plans,
selective expert loading, layer streaming, kernels and the pruned-checkpoint export."""
