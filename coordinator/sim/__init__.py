"""The churn simulator: virtual workers on a simulated clock around the coordinator's own job.

``crowdtrain sim SCENARIO.toml --out DIR`` (``coordinator.sim.main``); the scenario format is
in ``scenario``, the event loop in ``engine``, the files it writes in ``report``. See
docs/simulator.md.
"""
