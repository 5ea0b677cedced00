"""Contract suite: every gradient path of ``ConflictAverseOptimizer`` against every usage case.

In the spirit of torch's ``OptimizerInfo`` / ``optim_db``: :mod:`.paths` is the registry of
gradient paths (one record each), :mod:`.cases` the usage cases (each runs on one process or on
every rank of a 2-rank gloo group), :mod:`.oracle` an independent float64 reference, and
``test_contract.py`` the matrix paths x cases x dtypes x process counts.
"""
