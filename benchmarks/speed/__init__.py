"""Speed and memory at the floor: ``python -m benchmarks.speed [--sections ...] [--quick]``.

Sections (one module each): ``solver`` (the dual alone, against TorchJD and SLSQP), ``step``
(training-step time against the floor of m backward passes), ``memory`` (extra peak bytes of a
step over plain training, in units of the parameters' bytes), ``levers`` (the memory-bound parts
of the combination). ``report`` renders ``results/speed/speed.md``; ``peers`` holds the optional
TorchJD / SLSQP / cvxpy peers; ``models`` builds every model in code.
"""
