"""Running ablation jobs: each job is one `python -m parlm.run` subprocess (the public entry
point: papermill over the stage notebooks, resumable by run id), dispatched by an existing
engine rather than a scheduler of our own:

- "local": `concurrent.futures.ThreadPoolExecutor` with one worker per slot; a slot is a set
  of `nproc` GPUs (CUDA_VISIBLE_DEVICES) and each GPU holds `jobs_per_gpu` slots (an H200
  holds several ~40 GiB runs); on a machine without GPUs, one CPU slot;
- "submitit-local": submitit's LocalExecutor (every job its own process, all at once);
- "slurm": submitit's AutoExecutor, one SLURM job per ablation job with `nproc` GPUs.

Paired variants (switches acting after training) run in a second wave: their folder first
receives the base job's trained checkpoint of the same seed, and the train stage is marked
done, so the variant only re-quantizes / re-evaluates the same weights.
"""
from __future__ import annotations

import os
import queue
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from parlm import runlog
from parlm.ablate.variants import Job

PROJECT_ROOT = Path(__file__).resolve().parents[2]
TRAIN_FILES = ("final_model.pt", "train.json", "train.log", "metrics.jsonl")  # what the train stage leaves
TRAIN_NOTEBOOK = "03_train"
EXECUTORS = ("local", "submitit-local", "slurm")


def job_complete(job: Job) -> bool:
    """The job's per-seed pipeline finished (its summary stage marker exists)."""
    return runlog.stage_done(job.seed_dir, "summary")


def link_base_checkpoint(job: Job, base_seed_dir: Path) -> None:
    """Give a paired job the base job's trained weights (hard link, else copy) and train
    records, then mark its train stage (and the train notebook) done. Idempotent."""
    if runlog.stage_done(job.seed_dir, "train"):
        return
    if not runlog.stage_done(base_seed_dir, "train"):
        raise FileNotFoundError(f"paired variant {job.variant!r} seed {job.seed}: the base run "
                                f"{base_seed_dir} has not finished training")
    job.seed_dir.mkdir(parents=True, exist_ok=True)
    for name in TRAIN_FILES:
        source, target = base_seed_dir / name, job.seed_dir / name
        if not source.exists():
            continue
        target.unlink(missing_ok=True)
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)
    runlog.mark_stage_done(job.seed_dir, "train")
    try:
        from parlm.run import notebook_marker

        runlog.mark_stage_done(job.seed_dir, notebook_marker(TRAIN_NOTEBOOK))
    except ImportError:  # without the marker the notebook runs, and skips the finished stage
        pass


def run_job(job: Job, environment: dict | None = None, python: str | None = None) -> dict:
    """Run one job as a `python -m parlm.run` subprocess (output to <variant>/job_seed_<s>.log);
    returns {variant, seed, returncode, seconds, log}. A finished job is not rerun."""
    if job_complete(job):
        return {"variant": job.variant, "seed": job.seed, "returncode": 0, "seconds": 0.0, "skipped": True,
                "log": str(job.run_root / f"job_seed_{job.seed}.log")}
    job.run_root.mkdir(parents=True, exist_ok=True)
    log_path = job.run_root / f"job_seed_{job.seed}.log"
    env = dict(os.environ, **(environment or {}))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    started = time.perf_counter()
    with open(log_path, "ab") as log:
        code = subprocess.call(job.command(python or sys.executable), cwd=PROJECT_ROOT, env=env,
                               stdout=log, stderr=subprocess.STDOUT)
    return {"variant": job.variant, "seed": job.seed, "returncode": code,
            "seconds": time.perf_counter() - started, "skipped": False, "log": str(log_path)}


def gpu_slots(nproc: int, jobs_per_gpu: int, gpus: int | None = None) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES value per slot: GPUs grouped by `nproc`, each group repeated
    `jobs_per_gpu` times; [None] (one CPU slot) without GPUs."""
    if gpus is None:
        import torch

        gpus = torch.cuda.device_count()
    groups = [",".join(str(g) for g in range(start, start + nproc)) for start in range(0, gpus - nproc + 1, nproc)]
    return [group for group in groups for _ in range(max(1, jobs_per_gpu))] or [None]


def _run_local(jobs: list[Job], slots: list[str | None]) -> list[dict]:
    free: queue.Queue = queue.Queue()
    for slot in slots:
        free.put(slot)

    def run_in_slot(job: Job) -> dict:
        slot = free.get()
        try:
            return run_job(job, {"CUDA_VISIBLE_DEVICES": slot} if slot is not None else None)
        finally:
            free.put(slot)

    with ThreadPoolExecutor(max_workers=len(slots)) as pool:
        return list(pool.map(run_in_slot, jobs))


def _run_submitit(jobs: list[Job], executor_name: str, folder: Path, nproc: int, timeout_min: int,
                  slurm_partition: str | None) -> list[dict]:
    import submitit

    if executor_name == "slurm":
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
        extra = {"slurm_partition": slurm_partition} if slurm_partition else {}
        executor.update_parameters(timeout_min=timeout_min, gpus_per_node=nproc, tasks_per_node=1, nodes=1, **extra)
    else:
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(timeout_min=timeout_min)
    handles = [executor.submit(run_job, job) for job in jobs]
    results = []
    for job, handle in zip(jobs, handles):
        try:
            results.append(handle.result())
        except Exception as error:  # a job killed or crashed outside parlm.run: report, go on
            results.append({"variant": job.variant, "seed": job.seed, "returncode": -1, "seconds": None,
                            "skipped": False, "log": str(folder), "error": f"{type(error).__name__}: {error}"})
    return results


def dispatch(jobs: list[Job], executor: str = "local", jobs_per_gpu: int = 1, keep_going: bool = False,
             timeout_min: int = 120, slurm_partition: str | None = None, gpus: int | None = None,
             say=print) -> list[dict]:
    """Run unpaired jobs, then paired ones on the base checkpoints; returns one result per job
    (returncode != 0 for a failure, which stays resumable: rerun with the same run id).
    Without `keep_going`, paired jobs are not started after a failure of the first wave."""
    if executor not in EXECUTORS:
        raise ValueError(f"executor={executor!r} is not one of {EXECUTORS}")
    if not jobs:
        return []
    nproc = jobs[0].nproc
    waves = [[job for job in jobs if job.paired_with is None], [job for job in jobs if job.paired_with]]
    results: list[dict] = []
    for wave_index, wave in enumerate(waves):
        runnable = []
        for job in wave:
            if job.paired_with is None:
                runnable.append(job)
                continue
            base_dir = job.seed_dir.parents[1] / job.paired_with / f"seed_{job.seed}"
            try:
                link_base_checkpoint(job, base_dir)
                runnable.append(job)
            except FileNotFoundError as error:
                results.append({"variant": job.variant, "seed": job.seed, "returncode": -1, "seconds": None,
                                "skipped": False, "log": None, "error": str(error)})
        if not runnable:
            continue
        say(f"[ablate] wave {wave_index + 1}: {len(runnable)} job(s) via {executor}")
        if executor == "local":
            outcome = _run_local(runnable, gpu_slots(nproc, jobs_per_gpu, gpus))
        else:
            outcome = _run_submitit(runnable, executor, jobs[0].run_root.parent / "submitit", nproc,
                                    timeout_min, slurm_partition)
        for result in outcome:
            status = "skipped (done)" if result.get("skipped") else f"exit {result['returncode']}"
            say(f"[ablate] {result['variant']} seed {result['seed']}: {status}  log: {result['log']}")
        results.extend(outcome)
        if any(r["returncode"] != 0 for r in results) and not keep_going:
            break
    return results
