"""One module per ``premoe`` verb, named after it: ``calibrate``, ``refit``, ``prune`` (and ``plan``),
``eval``, ``inspect``, ``route``, ``generate``, ``chat``, ``serve``, ``sweep``, ``demo``. Each holds the
Python function, its parser (``add_parser``) and what the command prints (``run``); see :mod:`premoe.cli`."""
