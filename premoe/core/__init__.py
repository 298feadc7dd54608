"""What MoE and dense models share: checkpoint bytes and formats, model directories, data and tasks,
the pattern store, retrieval and evaluation."""
