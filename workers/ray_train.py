"""Running a TrainingSpec on Ray Train (v2): N TorchTrainer workers, DDP over the adapter, restore on failure.

Every worker runs `workers.loop.train` as one rank of the process group Ray Train sets up (gloo on
CPU, nccl on GPU). Rank 0 alone writes files and talks to the Reporter; its `control()` answer is
broadcast each step so all ranks stop together. Each checkpoint is reported with
`ray.train.report(..., checkpoint=Checkpoint.from_directory(...))`, which copies it to
`storage_path/name/step-NNNNNNNN`; after a worker failure Ray restarts the group
(`FailureConfig(max_failures)`) and `ray.train.get_checkpoint()` hands back the latest one.

Nothing on the driver's disk is read or written by a worker: each worker gets its inputs from a
`TrainingInputs` (workers.job_inputs: object-store keys it fetches itself, or a spec whose paths every
node sees) and works in a fresh directory under its own node's temp dir, removed when it ends.
`storage_path` (with `storage_filesystem`, e.g. pyarrow's S3FileSystem; see workers.ray_storage) must be
storage every node can reach when the workers span several nodes: Ray restores worker groups from it,
and the final adapter comes back to the driver through it.

`fit()` runs inside a Ray task the caller can stop: while it waits for resources, trains, or hangs
in a collective, `should_stop` is polled, and a yes aborts the run (see `_stop_fit`). Errors that
retrying cannot fix (an invalid config, a target module the model lacks, an unusable dataset) end
the run at once as TrainingSetupError instead of being retried `max_failures` times.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleet.log_format import WorkerLogging
from workers.checkpoints import checkpoint_name
from workers.job_inputs import LocalInputs, TrainingInputs, node_work_dir, remove_work_dir
from workers.loop import Runtime, TrainingResult, train
from workers.reporting import Reporter
from workers.spec import TrainingSpec

logger = logging.getLogger(__name__)

__all__ = ["GroupEntry", "TrainingAborted", "TrainingSetupError", "run_group_on_ray", "run_training_on_ray",
           "setup_error_message"]

_FINAL_DIR = "final"
_RESULT_FILE = "training_result.json"
_ABORT_GRACE_S = 2.0  # how long a stopped run may take to abort gracefully before it is killed
_SETUP_ERROR = "setup_error"  # key of the result a worker returns instead of raising a deterministic error
# Raised by bad input, not by the machine: the same spec fails the same way on every retry. Covers
# lora_core's LoraConfigError/TargetModulesError, DatasetFormatError, ChatTemplateError, pydantic's
# ValidationError (all ValueErrors). Infra errors (OSError, RuntimeError: OOM, NCCL) stay retryable.
_DETERMINISTIC_ERRORS = (ValueError, TypeError, KeyError, NotImplementedError)
# ValueErrors that a truncated or corrupted file raises (a restored checkpoint's JSON or text): not the
# spec's fault, so they stay retryable (Ray restores, the dispatcher hands back).
_CORRUPT_FILE_ERRORS = (UnicodeDecodeError, json.JSONDecodeError)


class TrainingAborted(Exception):
    """The run was stopped because `should_stop` asked for it; nothing of it is left running on Ray."""


class TrainingSetupError(Exception):
    """Training cannot succeed with this spec (config, target modules, dataset); retrying would not help."""


def _numbers_only(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}


def _close_reporter(reporter: Reporter | None) -> None:
    """Let a reporter that works in the background (JobReporter's checkpoint uploads) finish, so a
    paused or finished run's last checkpoint is recorded before the driver hears the run ended. An
    upload that fails or times out here is logged, in the job's log too, and does not fail a run that
    has ended: the job resumes, if ever, from the last checkpoint recorded."""
    close = getattr(reporter, "close", None)
    if close is None:
        return
    try:
        close()
    except Exception as e:
        logger.exception("finishing the checkpoint uploads at the end of the run")
        with contextlib.suppress(Exception):
            reporter.log(f"the last checkpoint upload did not complete: {e}", "warning")


def setup_error_message(error: BaseException) -> str | None:
    """What to tell about `error` if the spec itself caused it (retrying would fail the same way), else
    None: the error is the machine's or a corrupted file's, and worth a retry."""
    if isinstance(error, _CORRUPT_FILE_ERRORS) or not isinstance(error, _DETERMINISTIC_ERRORS):
        return None
    return f"{type(error).__name__}: {error}"


def _train_worker(config: dict[str, Any]) -> dict[str, Any]:
    """The per-worker function Ray runs; returns rank 0's TrainingResult as a dict."""
    import ray.train
    import ray.train.torch

    if config.get("logging") is not None:
        config["logging"].apply()
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    work_dir = node_work_dir(config["name"], rank)
    try:
        return _train_in(work_dir, config, rank, world_size)
    finally:
        remove_work_dir(work_dir)


def _train_in(work_dir: Path, config: dict[str, Any], rank: int, world_size: int) -> dict[str, Any]:
    """`_train_worker` in `work_dir`, this worker's own directory on its node."""
    import ray.train
    import ray.train.torch

    inputs: TrainingInputs = config["inputs"]
    spec, resume_from = inputs.fetch(work_dir)
    output_dir = work_dir / "out"
    reporter: Reporter | None = config["reporter_factory"]() if rank == 0 else None

    def on_checkpoint(step: int, path: Path | None, metrics: dict[str, float]) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(str(path)) if path is not None else None
        ray.train.report(
            _numbers_only(metrics), checkpoint=checkpoint, checkpoint_dir_name=checkpoint_name(step)
        )
        # A report is registered only once the controller has consumed it; wait for that, so a
        # worker dying right after a checkpoint still restarts from it.
        ray.train.get_all_reported_checkpoints()

    runtime = Runtime(rank=rank, world_size=world_size, device=_rank_device(config), on_checkpoint=on_checkpoint)
    with contextlib.ExitStack() as stack:
        restored = ray.train.get_checkpoint()
        if restored is not None:
            restored_dir = Path(stack.enter_context(restored.as_directory()))
            if (restored_dir / _RESULT_FILE).is_file():  # the run had already finished
                return json.loads((restored_dir / _RESULT_FILE).read_text())
            resume_from = restored_dir
            if reporter is not None:
                reporter.log(
                    f"worker group restarted; restoring from checkpoint {restored_dir.name}", "warning"
                )
        try:
            result = train(
                spec, output_dir=output_dir, reporter=reporter, resume_from=resume_from, runtime=runtime
            )
        except _DETERMINISTIC_ERRORS as e:
            _close_reporter(reporter)
            message = setup_error_message(e)
            if message is None:
                raise  # a corrupted file's, not the spec's: Ray restarts the group
            # Returned, not raised: Ray Train would restart the worker group for a raised error.
            return {_SETUP_ERROR: message}
        except BaseException:
            _close_reporter(reporter)
            raise
        _close_reporter(reporter)

    if result.status == "succeeded":
        # Hand the adapter to the driver through persistent storage, as a checkpoint of its own.
        final = None
        if rank == 0:
            final = work_dir / _FINAL_DIR
            shutil.copytree(result.adapter_dir, final / "adapter")
            (final / _RESULT_FILE).write_text(json.dumps(result.to_dict()))
        ray.train.report(
            _numbers_only(result.metrics),
            checkpoint=ray.train.Checkpoint.from_directory(str(final)) if final else None,
            checkpoint_dir_name=_FINAL_DIR,
        )
    return result.to_dict()


def run_training_on_ray(
    spec: TrainingSpec | TrainingInputs,
    *,
    output_dir: Path,
    reporter_factory: Callable[[], Reporter],
    num_workers: int = 1,
    use_gpu: bool = False,
    resources_per_worker: dict[str, float] | None = None,
    storage_path: str | Path,
    storage_filesystem: Any = None,
    name: str = "lorafleet-job",
    max_failures: int = 2,
    resume_from: Path | None = None,
    should_stop: Callable[[], str | None] | None = None,
    poll_s: float = 0.25,
    train_on_cpu: bool = False,
    worker_logging: WorkerLogging | None = None,
) -> TrainingResult:
    """Train `spec` on a Ray Train TorchTrainer and return rank 0's result.

    `spec` is what each worker trains: a TrainingSpec whose paths every node can read, or
    TrainingInputs that each worker fetches onto its own node (workers.job_inputs; the dispatcher's
    StoredInputs carry object-store keys and the checkpoint to resume from).
    `reporter_factory` is a picklable zero-argument callable, called inside the rank-0 worker.
    `worker_logging` (fleet.log_format) is applied in every worker: its lines name the job.
    `resume_from` (with a TrainingSpec) is a checkpoint directory of an earlier run of the same job;
    within this run, Ray's latest checkpoint takes precedence after a worker failure. The adapter ends
    in `output_dir/adapter` on the driver's machine.

    `should_stop` is called every `poll_s` while the run is on Ray; when it returns a reason, the run
    is killed and TrainingAborted(reason) raised. An error the spec itself causes raises
    TrainingSetupError without any retry.

    `train_on_cpu` with `use_gpu`: the "GPU"s in `resources_per_worker` are logical (CPU mode, see
    workers.placement); they place the workers, and the ranks train on the CPU with gloo.
    """
    import ray.train

    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    if isinstance(spec, TrainingSpec):
        inputs: TrainingInputs = LocalInputs(spec, resume_from)
    elif resume_from is not None:
        raise ValueError("resume_from goes with a TrainingSpec; TrainingInputs carry their own checkpoint")
    else:
        inputs = spec
    output_dir = Path(output_dir)
    trainer_kwargs = dict(
        train_loop_config={"inputs": inputs, "reporter_factory": reporter_factory, "name": name,
                           "logging": worker_logging},
        scaling_config=ray.train.ScalingConfig(
            num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources_per_worker
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=str(storage_path),
            storage_filesystem=storage_filesystem,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=max(inputs.n_checkpoints, 1) + 1),
        ),
    )
    if train_on_cpu:
        _train_on_cpu(trainer_kwargs)
    return_value, checkpoint, error = _run_abortable(trainer_kwargs, name, should_stop, poll_s)
    if error is not None:
        raise RuntimeError(f"training job {name!r} failed on Ray") from error
    if _SETUP_ERROR in return_value:
        raise TrainingSetupError(return_value[_SETUP_ERROR])
    result = TrainingResult.from_dict(return_value)
    if result.status == "succeeded" and checkpoint is not None:
        with checkpoint.as_directory() as final_dir:
            adapter = output_dir / "adapter"
            if Path(final_dir, "adapter").resolve() != adapter.resolve():
                shutil.copytree(Path(final_dir) / "adapter", adapter, dirs_exist_ok=True)
        result.adapter_dir = output_dir / "adapter"
    elif result.status == "paused" and checkpoint is not None:
        # The worker's own copy may sit on another node; the persisted one is reachable from here.
        result.checkpoint = Path(checkpoint.path)
    return result


def _train_on_cpu(trainer_kwargs: dict[str, Any]) -> None:
    """Let the ranks of a run placed by logical GPUs train on the CPU: gloo, not the NCCL Ray Train
    picks for use_gpu, and a CPU device (`_rank_device`)."""
    from ray.train.torch import TorchConfig

    trainer_kwargs["train_loop_config"]["train_on_cpu"] = True
    trainer_kwargs["torch_config"] = TorchConfig(backend="gloo")


def _rank_device(config: dict[str, Any]) -> Any:
    """This rank's torch device: Ray Train's, or the CPU for a run on logical GPUs (for which Ray Train
    hands out a cuda device even where there is no CUDA)."""
    import ray.train.torch
    import torch

    return torch.device("cpu") if config.get("train_on_cpu") else ray.train.torch.get_device()


def _fit(trainer_kwargs: dict[str, Any]) -> tuple[dict[str, Any], Any, BaseException | None]:
    """Body of the Ray task that runs one fit: (rank 0's return value, final checkpoint, error)."""
    from ray.train.torch import TorchTrainer

    ray_result = TorchTrainer(_train_worker, **trainer_kwargs).fit()
    return ray_result.return_value, ray_result.checkpoint, ray_result.error


def _run_abortable(
    trainer_kwargs: dict[str, Any], name: str, should_stop: Callable[[], str | None] | None, poll_s: float
) -> tuple[dict[str, Any], Any, BaseException | None]:
    """Run `_fit` as a Ray task (no CPU of its own) and wait for it, stopping it when asked to.

    Leaving this function any other way (KeyboardInterrupt on dispatcher shutdown) stops it too.
    """
    import ray

    groups_before = _placement_groups_of_this_job()
    task = ray.remote(num_cpus=0, max_retries=0)(_fit).remote(trainer_kwargs)
    finished = False
    try:
        while not ray.wait([task], timeout=poll_s)[0]:
            reason = should_stop() if should_stop is not None else None
            if reason:
                raise TrainingAborted(f"training run {name!r} stopped: {reason}")
        finished = True
        return ray.get(task)
    finally:
        if not finished:
            _stop_fit(task, name, groups_before)


def _stop_fit(task: Any, name: str, groups_before: set[str]) -> None:
    """Stop a running `_fit` task, whatever it is doing (waiting for resources, training, hung).

    First as Ctrl-C would: TorchTrainer.fit, on the task's main thread, answers SIGINT by aborting its
    controller, which shuts the worker group down and removes its placement group. If that has not
    ended the task within _ABORT_GRACE_S, the task is killed; its controller and workers die with it
    (actors die with their owner), but placement groups live as long as the job that made them (Ray
    Train's own cleaner needs the dashboard's state API), so the ones this run made are removed here:
    those made since it started by an actor now dead (`_orphaned_placement_groups`), never the groups
    of the other runs this dispatcher drives at the same time.
    """
    import ray

    started = time.monotonic()
    ray.cancel(task, force=False)
    if ray.wait([task], timeout=_ABORT_GRACE_S)[0]:
        logger.info("aborted training run %s (%.1fs)", name, time.monotonic() - started)
        return
    ray.cancel(task, force=True)
    ray.wait([task], timeout=_ABORT_GRACE_S)
    leftover = _orphaned_placement_groups(since=groups_before)
    _remove_placement_groups(leftover)
    logger.info("killed training run %s (%.1fs, removed %d placement group(s))",
                name, time.monotonic() - started, len(leftover))


def _remove_placement_groups(group_ids: set[str]) -> None:
    """Remove the placement groups with these hex ids. (`ray.util.placement_group` is the function, not
    the module: the class comes from the module itself.)"""
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    for group_id in group_ids:
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group_id))))


def _orphaned_placement_groups(since: set[str]) -> set[str]:
    """Ids of the live placement groups created under this driver's Ray job, not in `since`, whose
    creating actor is dead: a killed run's controller made them. A dispatcher runs many jobs at once,
    so groups made meanwhile by other runs' live controllers, or by the driver itself (a gang
    reservation), are not this run's. Ray's public table does not say who made a group; its GCS
    record does."""
    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    job_id = ray.get_runtime_context().get_job_id()
    orphaned = set()
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        record = gcs_pb2.PlacementGroupTableData.FromString(raw)
        group_id = record.placement_group_id.hex()
        made_by_an_actor = not ray.ActorID(record.creator_actor_id).is_nil()
        if (group_id.endswith(job_id) and group_id not in since and made_by_an_actor
                and record.creator_actor_dead and record.state != gcs_pb2.PlacementGroupTableData.REMOVED):
            orphaned.add(group_id)
    return orphaned


def _placement_groups_of_this_job() -> set[str]:
    """Ids of the live placement groups created under this driver's Ray job (an id ends with its job's)."""
    import ray

    job_id = ray.get_runtime_context().get_job_id()
    return {group_id for group_id, info in ray.util.placement_group_table().items()
            if group_id.endswith(job_id) and info["state"] != "REMOVED"}


# ------------------------------------------------------------------------------------ co-training
@dataclass(frozen=True)
class GroupEntry:
    """One member of a co-training group as the group's Ray task gets it (picklable, like the rest).

    `on_done(result)` ends the job where it trained, as soon as its training ends (publishes a
    succeeded one, records a pause or a cancel: workers.group_runner.MemberEnd); its reporter's
    checkpoint uploads are waited for first. Both run on a thread of their own (workers.member_ends)
    while the other members train on."""

    job_id: str
    inputs: TrainingInputs
    reporter_factory: Callable[[], Reporter]
    on_done: Callable[[TrainingResult], None] | None = None


MemberOutcomes = dict[str, "TrainingResult | BaseException"]


def run_group_on_ray(
    entries: list[GroupEntry],
    *,
    resources: dict[str, float],
    train_on_cpu: bool,
    name: str,
    should_stop: Callable[[], str | None] | None = None,
    poll_s: float = 0.25,
    worker_logging: WorkerLogging | None = None,
) -> MemberOutcomes:
    """Co-train `entries` (workers.cotrain.train_group) in ONE Ray task holding `resources` (the group's
    gang: one worker's bundle), and return each member's outcome: its TrainingResult, or the error that
    ended it (a spec's own error as TrainingSetupError, as run_training_on_ray raises it).

    `should_stop` is polled every `poll_s`; a reason kills the task and raises TrainingAborted. A
    member's cancel or pause does not stop the task: its reporter's control() takes it out of the
    group at its next step, and the others go on."""
    import ray

    bundle = dict(resources)
    options = {"num_cpus": bundle.pop("CPU", 1), "num_gpus": bundle.pop("GPU", 0), "resources": bundle,
               "max_retries": 0, "name": name}
    task = ray.remote(_train_group_task).options(**options).remote(entries, train_on_cpu, name, worker_logging)
    finished = False
    try:
        while not ray.wait([task], timeout=poll_s)[0]:
            reason = should_stop() if should_stop is not None else None
            if reason:
                raise TrainingAborted(f"co-training run {name!r} stopped: {reason}")
        finished = True
        returned = ray.get(task)
    finally:
        if not finished:
            ray.cancel(task, force=True)
            ray.wait([task], timeout=_ABORT_GRACE_S)
    return {job_id: (TrainingResult.from_dict(o["result"]) if "result" in o else o["error"])
            for job_id, o in returned.items()}


def _portable(error: BaseException) -> BaseException:
    """`error` as the driver should see it: a spec's own error as TrainingSetupError; anything that
    cannot travel back through Ray as a RuntimeError with its text."""
    import pickle

    message = setup_error_message(error)
    if message is not None:
        return TrainingSetupError(message)
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


def _train_group_task(entries: list[GroupEntry], train_on_cpu: bool, name: str,
                      worker_logging: WorkerLogging | None) -> dict[str, dict[str, Any]]:
    """Body of a co-training group's Ray task: fetch every member's inputs into its own directory, co-train
    them on one copy of the base, end each member as soon as it ends (GroupEntry.on_done).

    A member's end (its checkpoint uploads, then on_done) runs on a thread of its own
    (workers.member_ends), so the others train on meanwhile; the task returns, releasing the group's
    GPUs and the driver's heartbeats, only once every member's end is over or timed out."""
    import torch

    from workers.cotrain import GroupMember, MemberOutcome, train_group
    from workers.member_ends import MemberEnds, MemberEndTimedOut

    if worker_logging is not None:
        worker_logging.apply()
    root = node_work_dir(name, 0)
    outcomes: dict[str, dict[str, Any]] = {}
    reporters: dict[str, Reporter | None] = {}
    by_id = {e.job_id: e for e in entries}
    ends: MemberEnds[dict[str, Any]] = MemberEnds()
    try:
        members = []
        for entry in entries:
            try:
                spec, resume_from = entry.inputs.fetch(root / entry.job_id)
                reporters[entry.job_id] = reporter = entry.reporter_factory()
            except Exception as e:  # this member cannot start; the others go on
                outcomes[entry.job_id] = {"error": _portable(e)}
                continue
            members.append(GroupMember(entry.job_id, spec, root / entry.job_id / "out", reporter, resume_from))

        def member_done(job_id: str, outcome: MemberOutcome) -> None:
            ends.submit(job_id, lambda: _end_member(job_id, outcome, reporters.get(job_id), by_id[job_id].on_done))

        device = torch.device("cpu") if train_on_cpu or not torch.cuda.is_available() else torch.device("cuda")
        train_group(members, runtime=Runtime(rank=0, world_size=1, device=device), on_member_done=member_done)
    finally:
        stalled = []
        for job_id, ended in ends.wait().items():  # the adapters they publish lie under `root`
            outcomes[job_id] = {"error": _portable(ended)} if isinstance(ended, BaseException) else ended
            if isinstance(ended, MemberEndTimedOut):
                stalled.append(job_id)
        remove_group_work_dir(root, stalled)
    return outcomes


def remove_group_work_dir(root: Path, stalled: list[str]) -> None:
    """Remove a group task's work dir (a directory per member), but the directories of the members in
    `stalled`, whose ends still run past their timeout: a half-deleted checkpoint or adapter must not be
    what they upload. Their claims end once the driver hands them back; what is left goes with the node's
    sweep of dead workers' directories (workers.job_inputs.node_work_dir) once this worker process exits."""
    if not stalled:
        remove_work_dir(root)
        return
    for member_dir in root.iterdir() if root.exists() else ():
        if member_dir.name not in stalled:
            remove_work_dir(member_dir)
    logger.warning("the ends of co-trained jobs %s still run; their files stay under %s", ", ".join(stalled), root)


def _end_member(job_id: str, outcome: TrainingResult | BaseException, reporter: Reporter | None,
                on_done: Callable[[TrainingResult], None] | None) -> dict[str, Any]:
    """End one co-trained member where it trained (on its own thread, workers.member_ends): wait for its
    checkpoint uploads, then `on_done` for a result. Its outcome as the task returns it."""
    _close_reporter(reporter)  # a pause's checkpoint is recorded before the job is paused
    if isinstance(outcome, BaseException):
        return {"error": _portable(outcome)}
    if on_done is not None:
        try:
            on_done(outcome)
        except Exception as e:  # publishing or recording the end failed: the driver ends the job
            logger.exception("%s: ending the co-trained job where it trained failed", job_id)
            return {"error": _portable(e)}
    return {"result": outcome.to_dict()}
