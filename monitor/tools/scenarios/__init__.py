"""Small, fast models that reproduce a published failure mode, for demos and scenario tests.

One module per scenario; import from it directly (nothing is imported here, so a scenario's
dependencies load only when it is used):

* :mod:`monitor.tools.scenarios.plasticity` — loss of plasticity on a sequence of random-label
  tasks (Lyle et al. 2023; Dohare et al. 2024): ``build_plasticity``, ``run_tasks``.
* :mod:`monitor.tools.scenarios.gan` — GAN mode collapse (another part of the project).
"""
