"""The experiments' logic: each module has a config dataclass, named presets and ``main(argv)``.

cost.py           quadratic vs subquadratic cost: time, memory, FLOPs against N (+ the LRA Table 2 analog)
cost_report.py    the cost experiment's tables and plots, rebuilt from its stored rows
accuracy.py       every variant on every task, over seeds (the LRA Table 1 analog, Pareto plot)
approximation.py  error against "full" as each variant's budget grows; attention-pattern pictures
reproduce.py      the three above at one preset, then results/README.md

The scripts in ``experiments/`` are thin entry points that call these ``main`` functions;
``efficient-attn bench|train|reproduce`` call the same.
"""
