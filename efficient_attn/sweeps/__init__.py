"""The experiments' logic. Each experiment is a package split the same way: ``config.py``
(dataclasses), ``presets.py`` (named factories), ``run.py`` (measuring or training into the
RowStore), ``report.py`` (tables and plots from stored rows only), ``cli.py`` (``main(argv)``
on the shared command line of ``sweeps/cli.py``).

cost/             quadratic vs subquadratic cost: time, memory, FLOPs against N (+ the LRA Table 2 analog)
accuracy/         every variant on every task, over seeds (the LRA Table 1 analog, Pareto plot)
approximation/    error against "full" as each variant's budget grows; attention-pattern pictures
exact.py          full vs blockwise vs jax.nn.dot_product_attention
cli.py            the flags every experiment shares, one-line errors, exit status from rows
reproduce.py      all of the above at one preset, then results/README.md

The scripts in ``experiments/`` are thin entry points that call these ``main`` functions;
``efficient-attn bench|train|reproduce`` call the same.
"""
