"""A sweep's runs trained in packs on shared frozen backbones: `hydra/launcher=packed`.

The flow, one module each:
- grouping.py: which jobs can share a backbone (and so a pack);
- plan.py: each group's packs, balanced over the devices, and the report of why;
- places.py, ray_place.py: where the packs train (this process, this machine's workers, submitit
  jobs, Ray tasks), each pack's members trained by ptlab/training/job.py's `run_jobs`;
- halving.py: successive halving, the launcher's scheduler (rungs, brackets, decisions);
- hooks.py: Hydra's per-job callbacks for packed jobs, and the failed-jobs report at the end;
- launcher.py: the launcher itself (Hydra finds it through hydra_plugins/ptlab_launcher).
"""
