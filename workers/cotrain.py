"""Co-training: several jobs' adapters trained on one shared base in one process, one forward pass per step.

Each job (a GroupMember) is set up exactly as `workers.loop.train` sets up a job alone — its own data
plan, hyperparameters, adapter (initialised from its own seed), AdamW and LR schedule — on one model
that holds every member's adapter under its own name. A group step takes the next micro-batch of each
member and lays their tokens end to end in one row of N = Σ n_j tokens: the segments (examples and
padding, workers/attention.py) keep attention within each example, and lora_core.route_tokens applies
member j's adapter to j's tokens only, with j's own dropout seeds. The base runs once over all of them.
The summed loss

    L = Σ_j L_j / n_j        L_j: j's summed token cross-entropy, n_j: the loss tokens of j's whole step

is backpropagated once: adapter j touches only j's tokens, so its gradient is ∂L_j/∂θ_j / n_j, the one
it gets alone. A member's optimizer steps when every micro-batch of its step is in (its own batch size
and accumulation); what follows a step — metrics, evaluation, checkpoints, early stopping, control — is
workers.loop's, per member. A member that ends (done, cancelled, paused, failed) leaves the group and
the others go on. On a device (or under `Runtime.max_micro_batch_tokens`) the members' micro-batches
share one pass's token budget (`pass_token_budget`, split by `_plan_split`), re-planned when a member
leaves. A pass that runs out of memory is retried after the member with the most tokens in it gives way
(`_give_way`: it backs off as alone, or takes a pass of its own for good); a pass that fails otherwise
is retried with each of its members in a pass of its own (`_retry_alone`): only a member whose own
pass fails gets the error, the others rejoin the shared pass after that step. A member's side effects
there (its reporter's warnings) fail that member only. A base with dropout of its own (`base_draws`)
draws from the global RNG: then every member trains in passes of its own with its own RNG stream
swapped in (`_own_rng`), so it draws what it draws alone. In fp32 each adapter equals the one trained
alone up to the rounding of larger matmuls.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from workers.checkpoints import capture_rng_state, restore_rng_state
from workers.loop import (
    JobRun,
    Progress,
    Runtime,
    StepCounts,
    TrainingResult,
    TrainState,
    add_job_adapter,
    after_step,
    back_off,
    begin,
    claim_device,
    end,
    end_step,
    initial_state,
    load_base,
    one_sequence_does_not_fit,
    planned_steps,
    route,
    setup_job,
    step_counts,
    uses_bf16,
)
from workers.memory_plan import DecoderShape, MemberSplit, plan_group_micro_batches, plan_micro_batch, query_size
from workers.packing import Batch, DataPosition
from workers.reporting import Reporter
from workers.reporting_thread import ThreadedReporter
from workers.spec import TrainingSpec
from workers.token_loss import TokenLoss

logger = logging.getLogger(__name__)

__all__ = ["GroupMember", "MemberOutcome", "base_draws", "pass_token_budget", "train_group"]

MemberOutcome = TrainingResult | BaseException  # an exception: this member failed, the others went on


@dataclass
class GroupMember:
    """One job of a group: what `workers.loop.train` would get for it alone."""

    job_id: str
    spec: TrainingSpec  # every member: the same base_model and quantization
    output_dir: Path
    reporter: Reporter | None  # this job's own; its control() steers this job only
    resume_from: Path | None = None  # a checkpoint this job wrote, alone or in a group (same format)


@dataclass
class _Member:
    """A member while it trains: its run and state, and where it stands in its current step."""

    job_id: str
    run: JobRun
    state: TrainState
    progress: Progress
    steps: Iterator[list[Batch]]  # the micro-batches of each next step (workers.loop.planned_steps)
    threaded: ThreadedReporter | None  # to close when the member ends
    micro: list[Batch] = field(default_factory=list)  # the current step's micro-batches
    done: int = 0  # how many of them went through forward and backward
    counts: StepCounts | None = None
    loss_total: torch.Tensor | None = None
    lane: int = 0  # members of one lane share a forward pass (one lane unless memory ran short, _give_way)
    home_lane: int | None = None  # the shared lane it rejoins once its step retried alone is done (_retry_alone)
    rejoined: bool = False  # it rejoined once: a second failed shared pass keeps it in a lane of its own
    rng: dict[str, Any] | None = None  # its own RNG stream, swapped in around its passes (a base that draws)
    most: int = 0  # most sequences per micro-batch: its split as set up alone, lowered by a back-off
    planned: tuple[int, str] | None = None  # the group plan's micro-batch for its next step, and why


def train_group(
    members: Sequence[GroupMember],
    *,
    runtime: Runtime | None = None,
    on_member_done: Callable[[str, MemberOutcome], None] | None = None,
) -> dict[str, MemberOutcome]:
    """Train every member's adapter on one copy of the base; each one's result is what `train` alone gives.

    `on_member_done(job_id, outcome)` is called as soon as a member ends, while the others go on (an
    exception it raises is logged and swallowed). A member whose setup fails gets its exception as
    outcome (all of them, when the base itself does not load). One process and one device:
    `runtime.world_size` must be 1; a group that cannot share one base raises ValueError.
    """
    runtime = runtime or Runtime()
    _check_group(members, runtime)
    outcomes: dict[str, MemberOutcome] = {}
    if not members:
        return outcomes

    def done(member_id: str, outcome: MemberOutcome) -> None:
        outcomes[member_id] = outcome
        if isinstance(outcome, BaseException):
            logger.error("co-trained job %s failed: %s", member_id, outcome, exc_info=outcome)
        if on_member_done is not None:
            try:
                on_member_done(member_id, outcome)
            except Exception:
                logger.exception("on_member_done(%r) raised; the group goes on", member_id)

    device = claim_device(runtime)
    first = members[0].spec
    compute_dtype = torch.bfloat16 if uses_bf16(first, runtime, device) else torch.float32
    checkpointing = any(m.spec.gradient_checkpointing for m in members)  # memory only: the math is the same
    try:
        model = load_base(first.model_copy(update={"gradient_checkpointing": checkpointing}), device, compute_dtype,
                          runtime.attention)
    except Exception as error:  # no base, no member: each one's outcome, as a setup failure of its own would be
        for member in members:
            done(member.job_id, error)
        return outcomes
    loss_module = TokenLoss(model)
    draws = base_draws(model)  # the base's own dropout: each member's draws must be its own (_own_rng)
    running = [
        m for m in (_start(member, i, len(members), model, loss_module, device, runtime, done, draws)
                    for i, member in enumerate(members))
        if m is not None
    ]
    if draws:
        logger.info("co-training %d jobs in passes of their own over one base: the base draws dropout "
                    "(%s) from the RNG", len(running), ", ".join(draws))

    def fail(member: _Member, error: BaseException) -> None:
        """This member ends with `error`; the others go on."""
        running.remove(member)
        _leave(member, model, done, _raise(error))

    autocast = running[0].run.autocast if running else None
    device_bytes = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    budget = functools.partial(pass_token_budget, model, device_bytes=device_bytes, compute_dtype=compute_dtype,
                               gradient_checkpointing=checkpointing, quantization=first.quantization,
                               cap=runtime.max_micro_batch_tokens)
    planned_for: set[str] = set()
    while running:
        if {m.job_id for m in running} != planned_for:  # at the start, and after a member left
            _plan_split(running, budget(), first_plan=not planned_for)
            planned_for = {m.job_id for m in running}
        for member in list(running):
            try:
                if not member.micro:
                    _take_planned_split(member)
                has_step = bool(member.micro) or _next_step(member)
            except Exception as error:  # its own data or plan: this member fails, the others go on
                fail(member, error)
                continue
            if not has_step:
                running.remove(member)
                _leave(member, model, done, lambda m=member: end(m.run, m.state, m.progress))
        for in_pass in _passes(running):
            with _own_rng(in_pass):
                try:
                    losses = _forward_backward(model, loss_module, autocast, in_pass)
                except torch.OutOfMemoryError as error:
                    reason = str(error) or type(error).__name__
                except Exception as error:  # alone in its pass, the member fails; shared, each retries alone
                    if len(in_pass) == 1:
                        fail(in_pass[0], error)
                    else:
                        _retry_alone(in_pass, running, error, fail)
                    continue
                else:
                    _after_pass(in_pass, losses, running, model, done, fail)
                    continue
            # Outside the except block: the traceback, and the activations its frames hold, are released.
            _give_way(in_pass, running, reason, fail)
    return outcomes


def base_draws(model: nn.Module) -> list[str]:
    """What in the base (not the adapters) draws random numbers in a training forward pass: config
    dropout probabilities above 0 (attention_dropout, hidden_dropout, resid_pdrop, layerdrop, ...) and nn.Dropout
    modules with p > 0 outside the adapters. Empty for Llama, Qwen, Mistral as shipped (all 0.0)."""
    from lora_core.layers import LoraLinear

    config = getattr(model, "config", None)
    values = config.to_dict() if config is not None and hasattr(config, "to_dict") else {}
    found = [f"{key}={value}" for key, value in sorted(values.items())
             if any(word in key for word in ("dropout", "pdrop", "layerdrop")) and isinstance(value, (int, float))
             and not isinstance(value, bool) and value > 0]
    lora_dropouts = {id(d) for module in model.modules() if isinstance(module, LoraLinear)
                     for d in module.lora_dropout.values()}
    modules = [name for name, module in model.named_modules()
               if isinstance(module, nn.Dropout) and module.p > 0 and id(module) not in lora_dropouts]
    if modules:
        found.append(f"{len(modules)} nn.Dropout modules such as {modules[0]}")
    return found


@contextlib.contextmanager
def _own_rng(in_pass: list[_Member]) -> Iterator[None]:
    """Around a pass of one member that has its own RNG stream (a base that draws, `base_draws`): its
    stream is the global one (python, numpy, torch CPU and CUDA, what checkpoints hold) while the pass
    and what follows it (its checkpoint) run, so it draws exactly what it draws alone."""
    owner = in_pass[0] if len(in_pass) == 1 and in_pass[0].rng is not None else None
    if owner is None:
        yield
        return
    restore_rng_state(owner.rng)
    try:
        yield
    finally:
        owner.rng = capture_rng_state()


def _passes(running: list[_Member]) -> list[list[_Member]]:
    """The members of each lane: one forward pass each in this round."""
    return [[m for m in running if m.lane == lane] for lane in sorted({m.lane for m in running})]


def _after_pass(in_pass: list[_Member], losses: list[torch.Tensor], running: list[_Member], model: nn.Module,
                done: Callable[[str, MemberOutcome], None], fail: Callable[[_Member, BaseException], None]) -> None:
    """Count the pass's micro-batch for each member in it; a member whose step is complete steps its
    optimizer, and one that retried its step alone rejoins its shared lane (`_retry_alone`)."""
    for member, loss in zip(in_pass, losses, strict=True):
        member.loss_total += loss
        member.done += 1
        if member.done < len(member.micro):
            continue
        try:
            result = _complete_step(member)
        except Exception as error:  # its reporter, its checkpoint, ...: this member fails alone
            fail(member, error)
            continue
        if result is not None:
            running.remove(member)
            _leave(member, model, done, lambda r=result: r)
        elif member.home_lane is not None:
            member.lane, member.home_lane, member.rejoined = member.home_lane, None, True


def _safely(member: _Member, fail: Callable[[_Member, BaseException], None], work: Callable[[], None]) -> None:
    """`work` on behalf of `member` (its reporter, its state); if it raises, this member fails, the others go on."""
    try:
        work()
    except Exception as error:
        fail(member, error)


def _give_way(in_pass: list[_Member], running: list[_Member], reason: str,
              fail: Callable[[_Member, BaseException], None]) -> None:
    """After a pass ran out of memory: the member with the most tokens in it gives way, as it would alone.

    Every member of the pass drops its step's gradients (a backward cut short may have added to them)
    and retries its step from the first micro-batch. The member with the most tokens in the pass then
    halves its micro-batch (`workers.loop.back_off`, as alone: the same rows per step); already at one
    sequence, it moves to a lane of its own for good (a pass to itself, the others keep theirs: the
    sizes that did not fit together stay the same, so rejoining would run out of memory again); alone
    in its pass at one sequence, it fails with the error it gets alone, the others go on. An error of
    its reporter while it says so fails that member only.
    """
    largest = max(in_pass, key=lambda m: m.micro[m.done].inputs["input_ids"].numel())  # rows × width
    _reset_step(in_pass)
    first_line = reason.splitlines()[0]
    if largest.state.batch_size > 1:
        largest.planned, largest.micro = None, []  # re-planned with the new split (workers.loop.planned_steps)
        _safely(largest, fail, functools.partial(back_off, largest.run, largest.state, first_line))
        largest.most = largest.state.batch_size  # no plan grows it back past this
        return
    if len(in_pass) == 1:
        fail(largest, one_sequence_does_not_fit(largest.run, reason))
        return
    largest.lane = max(m.lane for m in running) + 1
    largest.home_lane = None  # out of memory beside the others: it does not rejoin them
    if largest.run.say:
        _safely(largest, fail, functools.partial(
            largest.run.say.log,
            f"out of memory at step {largest.state.step + 1} ({first_line}) with one sequence per micro-batch "
            f"beside {len(in_pass) - 1} other jobs: retrying it in a forward pass of its own", "warning"))


def _retry_alone(in_pass: list[_Member], running: list[_Member], error: Exception,
                 fail: Callable[[_Member, BaseException], None]) -> None:
    """After a shared pass failed with an error that is not out-of-memory: nobody can tell whose tokens
    caused it, so every member of the pass drops its step's gradients (as in `_give_way`) and retries
    its step in a lane of its own. A member whose own pass fails then gets the error; one whose step
    succeeds rejoins the shared lane (`_after_pass`; only the rounding of the pass's larger matmuls
    changes), once: after a second failed shared pass it keeps its own lane. An error of a member's
    reporter while it says so fails that member only."""
    first_line = (str(error) or type(error).__name__).splitlines()[0]
    _reset_step(in_pass)
    lane = max(m.lane for m in running)
    for member in in_pass:
        member.home_lane = None if member.rejoined else member.lane
        lane += 1
        member.lane = lane
        if member.run.say:
            again = "" if member.home_lane is not None else ", and in passes of its own from then on"
            _safely(member, fail, functools.partial(
                member.run.say.log,
                f"a forward pass shared with {len(in_pass) - 1} other jobs failed at step "
                f"{member.state.step + 1} ({type(error).__name__}: {first_line}): retrying the step in a pass "
                f"of its own{again}", "warning"))


def _reset_step(in_pass: list[_Member]) -> None:
    """Every member of a failed pass drops its step's gradients (a backward cut short may have added to
    them) and retries its step from the first micro-batch."""
    for member in in_pass:
        member.run.optimizer.zero_grad(set_to_none=True)
        member.done = 0
        member.loss_total.zero_()
    if in_pass[0].run.device.type == "cuda":
        torch.cuda.empty_cache()


def _check_group(members: Sequence[GroupMember], runtime: Runtime) -> None:
    """Refuse a group that cannot share one base and one forward pass; every problem in one error."""
    problems = []
    if runtime.world_size != 1:
        problems.append(f"runtime.world_size is {runtime.world_size}: co-training runs in one process (1)")
    if runtime.attention != "varlen":
        problems.append(f"runtime.attention is {runtime.attention!r}: co-training lays the members' tokens in "
                        "one row and needs the 'varlen' attention")
    ids = [m.job_id for m in members]
    if len(set(ids)) != len(ids):
        problems.append(f"job ids must be distinct, got {ids}")
    if members:
        first = members[0]
        device = runtime.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        for other in members[1:]:
            for name in ("base_model", "quantization"):
                if getattr(other.spec, name) != getattr(first.spec, name):
                    problems.append(f"{name}: job {first.job_id} has {getattr(first.spec, name)}, job "
                                    f"{other.job_id} has {getattr(other.spec, name)}; co-train only jobs on "
                                    "the same base")
            if uses_bf16(other.spec, runtime, device) != uses_bf16(first.spec, runtime, device):
                problems.append(f"bf16: job {first.job_id} has {first.spec.bf16}, job {other.job_id} has "
                                f"{other.spec.bf16}; one forward pass has one precision")
    if problems:
        raise ValueError("cannot co-train this group: " + "; ".join(problems))


def _adapter_name(index: int) -> str:
    return f"job{index}"  # lora_core names: no dots; the saved files do not carry it


def _start(
    member: GroupMember,
    index: int,
    group_size: int,
    model: nn.Module,
    loss_module: TokenLoss,
    device: torch.device,
    runtime: Runtime,
    done: Callable[[str, MemberOutcome], None],
    draws: list[str],
) -> _Member | None:
    """Add the member's adapter and set its run up as train() would; None (outcome reported) if that fails.

    Where the base draws random numbers (`draws`, see `base_draws`) the member gets a lane of its own and
    keeps its own RNG stream: the global one as its setup (and resume) leaves it, as alone."""
    from lora_core import delete_adapter, list_adapters

    background = runtime.report_in_background if runtime.report_in_background is not None else device.type == "cuda"
    threaded = ThreadedReporter(member.reporter) if background and member.reporter is not None else None
    reporter = threaded or member.reporter
    name = _adapter_name(index)
    try:
        add_job_adapter(model, member.spec, name)
        run = setup_job(member.spec, Path(member.output_dir), reporter, runtime, device, model, name, loss_module)
        if reporter is not None:
            own = (f", in forward passes of its own: the base draws its own dropout ({', '.join(draws)}) from "
                   "the RNG, and this job's draws must be the ones it makes alone") if draws else ""
            reporter.log(f"co-trained with {group_size - 1} other jobs on one copy of the base model{own}")
        state = initial_state(run, member.resume_from)
        progress = begin(run, state)
        rng = capture_rng_state() if draws else None
    except Exception as error:
        if name in list_adapters(model):
            delete_adapter(model, name)
        _close(threaded)
        done(member.job_id, error)
        return None
    return _Member(member.job_id, run, state, progress, planned_steps(run, state), threaded, most=state.batch_size,
                   lane=index if draws else 0, rng=rng)


def pass_token_budget(model: nn.Module, *, device_bytes: int | None, compute_dtype: torch.dtype,
                      gradient_checkpointing: bool, quantization: str | None, cap: int | None = None) -> int | None:
    """The tokens one group pass over `model` may hold, or None where nothing is planned (no device size
    and no `cap`: a CPU without `Runtime.max_micro_batch_tokens`, as alone).

    On a device of `device_bytes`: workers.memory_plan.plan_micro_batch with the one base and the adapter
    state of every adapter still in the model (16 bytes a parameter), so it grows as members leave;
    `cap` (the CPU stand-in for the device) bounds it as well.
    """
    budgets = [] if cap is None else [cap]
    if device_bytes is not None:
        frozen = [t for t in (*model.parameters(), *model.buffers()) if not t.requires_grad]
        plan = plan_micro_batch(
            device_bytes=device_bytes,
            weights_bytes=sum(t.numel() * t.element_size() for t in frozen),
            n_adapter_params=sum(p.numel() for p in model.parameters() if p.requires_grad),  # every member's
            shape=DecoderShape.from_config(model.config),
            activation_bytes=torch.finfo(compute_dtype).bits // 8,
            gradient_checkpointing=gradient_checkpointing, quantization=quantization,
            q_size=query_size(model.config))
        budgets.append(plan.max_tokens)
    return min(budgets) if budgets else None


def _plan_split(running: list[_Member], budget_tokens: int | None, *, first_plan: bool) -> None:
    """Share one pass's token budget among the members' micro-batches (max-min fair,
    workers.memory_plan.plan_group_micro_batches); each takes its share at its next step (`_take_planned_split`).

    Only an "auto" batch size is planned, as alone (an explicit one is taken as given). The first plan may
    shrink it to any divisor of its step's sequences (a job alone on a smaller device would get that
    split). A later one, after a member left, only grows a member back towards its split as set up
    alone (`most`), and only one without LoRA dropout: the rows of every step stay the same, so the loss
    does too, up to rounding, but dropout masks follow the micro-batches' positions, which a new split
    renumbers (the same reason a run that backed off differs from one that did not). A member with its
    own RNG stream (a base that draws, `base_draws`) has passes of its own: it is planned alone against
    the whole budget, and never re-planned (the base's masks follow the micro-batches too).
    """
    if budget_tokens is None:
        return
    shared = [m for m in running if m.rng is None]
    for sharing in ([shared] if shared else []) + [[m] for m in running if m.rng is not None]:
        splits = []
        for m in sharing:
            state, spec = m.state, m.run.spec
            current = m.planned[0] if m.planned else state.batch_size
            plannable = spec.hyperparameters.batch_size == "auto" and (
                first_plan or (spec.init_adapter is None and spec.lora.dropout == 0 and m.rng is None))
            least = 1 if first_plan and plannable else current
            most = m.most if plannable else current
            splits.append(MemberSplit(spec.max_seq_len, state.batch_size * state.gradient_accumulation_steps,
                                      least=least, most=max(most, least)))
        why = f"{budget_tokens} tokens a forward pass for {len(sharing)} jobs" if sharing is shared else (
            f"{budget_tokens} tokens a forward pass of its own")
        for m, micro in zip(sharing, plan_group_micro_batches(budget_tokens, splits), strict=True):
            m.planned = (micro, why)


def _take_planned_split(member: _Member) -> None:
    """At a step boundary: the planned micro-batch size with the accumulation that keeps the step's
    sequences (the loop's back-off renumbers the data position the same way)."""
    planned, state = member.planned, member.state
    member.planned = None
    if planned is None or planned[0] == state.batch_size:
        return
    micro, why = planned
    sequences = state.batch_size * state.gradient_accumulation_steps
    rows = state.position.batch_index * state.batch_size  # at a step boundary: whole steps of the epoch
    if sequences % micro or rows % micro:
        return  # not a split of this step's rows: keep the current one
    state.batch_size, state.gradient_accumulation_steps = micro, sequences // micro
    state.position = DataPosition(state.position.epoch, rows // micro)
    # planned_steps re-plans from this position with the new split (as after a back-off)
    if member.run.say:
        member.run.say.log(f"co-training memory plan ({why}): from step {state.step + 1}, micro-batches of "
                           f"{micro} sequences and {state.gradient_accumulation_steps} accumulation steps")


def _next_step(member: _Member) -> bool:
    """Take the member's next step's micro-batches; False when its run is done."""
    micro = next(member.steps, None)
    if micro is None:
        return False
    member.micro, member.done = micro, 0
    member.counts = step_counts(member.run, micro)
    member.loss_total = torch.zeros((), dtype=torch.float64, device=member.run.device)
    return True


def _complete_step(member: _Member) -> TrainingResult | None:
    """The member's optimizer step and what follows it (workers.loop.after_step); its result if it ends."""
    run, state = member.run, member.state
    record = end_step(run, state, member.micro, member.loss_total, member.counts)
    member.micro = []
    return after_step(run, state, member.progress, record)


def _concatenated(batches: list[Batch], device: torch.device) -> tuple[dict[str, Any], list[tuple[int, int]],
                                                                       list[torch.Tensor], torch.Tensor]:
    """One row of every batch's tokens end to end: decoder inputs, each batch's token span, its loss
    positions in the row and the row's labels."""
    ids, positions, labels, spans, loss_positions = [], [], [], [], []
    bounds = [0]
    offset = 0
    for batch in batches:
        n = batch.inputs["input_ids"].numel()
        ids.append(batch.inputs["input_ids"].reshape(-1))
        positions.append(batch.inputs["position_ids"].reshape(-1))
        labels.append(batch.inputs["labels"].reshape(-1))
        bounds += [offset + b for b in batch.inputs["cu_seq_lens_host"][1:]]  # its segments, shifted
        loss_positions.append((batch.loss_positions + offset).to(device, non_blocking=True))
        spans.append((offset, offset + n))
        offset += n
    inputs = {
        "input_ids": torch.cat(ids)[None].to(device, non_blocking=True),  # (1, N)
        "position_ids": torch.cat(positions)[None].to(device, non_blocking=True),
        "cu_seq_lens_q": torch.tensor(bounds, dtype=torch.int32).to(device, non_blocking=True),
        "max_length_q": max(batch.inputs["max_length_q"] for batch in batches),
        "cu_seq_lens_host": tuple(bounds),
    }
    return inputs, spans, loss_positions, torch.cat(labels).to(device, non_blocking=True)


def _forward_backward(
    model: nn.Module, loss_module: TokenLoss, autocast: Callable, running: list[_Member]
) -> list[torch.Tensor]:
    """One forward and one backward over the next micro-batch of every member in `running`; each one's summed loss."""
    from lora_core import route_tokens

    batches = [m.micro[m.done] for m in running]
    inputs, spans, loss_positions, labels = _concatenated(batches, running[0].run.device)
    _check_token_cap(running[0].run.runtime, inputs["input_ids"].numel())
    routes = {
        m.run.adapter_name: route(m.run, batch, start, end)
        for m, batch, (start, end) in zip(running, batches, spans, strict=True)
    }
    with route_tokens(model, routes):  # open over backward: checkpointing recomputes the forward there
        with autocast():
            hidden = loss_module.causal_lm.get_decoder()(**inputs, use_cache=False).last_hidden_state  # (1, N, H)
            hidden = hidden.flatten(0, 1)  # (N, H)
            losses = [
                loss_module.head_loss(hidden.index_select(0, at), labels.index_select(0, at + 1))[0]
                for at in loss_positions
            ]
        total = sum(loss * m.counts.scale for loss, m in zip(losses, running, strict=True))
        total.backward()
    return [loss.detach() for loss in losses]


def _check_token_cap(runtime: Runtime, n_tokens: int) -> None:
    """The CPU stand-in for the device's memory (`Runtime.max_micro_batch_tokens`), on the pass's tokens:
    the group's one micro-batch."""
    cap = runtime.max_micro_batch_tokens
    if cap is not None and n_tokens > cap:
        raise torch.OutOfMemoryError(f"micro-batch of {n_tokens} tokens > Runtime.max_micro_batch_tokens={cap}")


def _raise(error: BaseException) -> Callable[[], TrainingResult]:
    def fail() -> TrainingResult:
        raise error

    return fail


def _leave(
    member: _Member, model: nn.Module, done: Callable[[str, MemberOutcome], None], outcome: Callable[[], TrainingResult]
) -> None:
    """The member's outcome (a result, or the error computing it raised); its adapter leaves the model."""
    from lora_core import delete_adapter

    try:
        result: MemberOutcome = outcome()
    except Exception as error:
        result = error
    delete_adapter(model, member.run.adapter_name)  # its optimizer and run go with the member
    try:
        _close(member.threaded)
    except Exception as error:
        result = result if isinstance(result, BaseException) else error
    done(member.job_id, result)


def _close(threaded: ThreadedReporter | None) -> None:
    """Deliver what the member's reporter still holds (train() does the same before it returns)."""
    if threaded is not None:
        threaded.close()
