"""Scaling-law studies: an IsoFLOP grid of pretraining runs on your text and the law fitted to it.

- `chatforge.study.grid`: the study YAML (`StudyConfig`, `load_study`) and its grid of runs
  (`plan_grid`), checked before any run starts.
- `chatforge.study.runner`: `chatforge scaling study CONFIG` / `chatforge scaling fit DIR`; each run
  is the pretrain stage's `train_on_blocks`, resumable, in its own folder.
- `chatforge.study.workers`: how the runs are trained, one after another (`jobs: 1`) or `jobs` at
  a time in worker processes, longest first, each line of output prefixed with its run's name.
- `chatforge.study.report`: the fits (chatforge.plan.fit), bootstrap spread and predictions ->
  report.md, scaling.png, scaling.json (read back by `chatforge plan --law`).
"""

__all__ = ["grid", "report", "runner", "workers"]
