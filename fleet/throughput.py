"""Measured training speed per base model and accelerator kind: what finished jobs saw, for estimates.

A job that succeeds records the tokens per second its training loop measured, divided by its workers;
each (accelerator kind, base model) keeps an exponentially weighted mean of those,
    ewma ← (1 − w)·ewma + w·sample      (w = EWMA_WEIGHT; the first sample sets it),
so a cluster's recent jobs count most. The estimate endpoint (fleet.estimate) turns it into a duration.
"""

from __future__ import annotations

import json
import logging

import redis
from pydantic import BaseModel

from fleet import keys
from fleet.settings import Settings, check_redis_client

__all__ = ["EWMA_WEIGHT", "MeasuredThroughput", "ThroughputStore", "accelerator_kind", "record_job_throughput"]

logger = logging.getLogger(__name__)

EWMA_WEIGHT = 0.3

# KEYS: throughput hash.  ARGV: field, sample (tokens/s per worker), weight.
# Updates the field's EWMA in one step, stamped with the Redis clock.
_RECORD = """
local now = redis.call('TIME')
local sample = tonumber(ARGV[2])
local raw = redis.call('HGET', KEYS[1], ARGV[1])
local ewma, jobs = sample, 1
if raw then
  local old = cjson.decode(raw)
  ewma = (1 - tonumber(ARGV[3])) * old['tokens_per_s_per_worker'] + tonumber(ARGV[3]) * sample
  jobs = old['jobs'] + 1
end
local value = cjson.encode({tokens_per_s_per_worker = ewma, jobs = jobs, updated_at = tonumber(now[1])})
redis.call('HSET', KEYS[1], ARGV[1], value)
return value
"""


def accelerator_kind(settings: Settings) -> str:
    """What a job's workers train on: the accelerator resource's name on GPUs, "cpu" otherwise."""
    return settings.accelerator_resource if settings.use_gpu else "cpu"


class MeasuredThroughput(BaseModel):
    """The running mean of finished jobs' training speed on one base model and accelerator kind."""

    tokens_per_s_per_worker: float
    jobs: int  # how many finished jobs it averages
    updated_at: int  # unix seconds of the last one


class ThroughputStore:
    """Reads and updates the measured training speed (keys.throughput)."""

    def __init__(self, client: redis.Redis) -> None:
        check_redis_client(client)
        self.redis = client
        self._record = client.register_script(_RECORD)

    @staticmethod
    def _field(accelerator: str, base_model: str) -> str:
        return json.dumps([accelerator, base_model])

    def record(self, accelerator: str, base_model: str, *, tokens_per_s: float, workers: int) -> MeasuredThroughput:
        """Fold a finished job's speed (all its workers together) into the mean for its base model."""
        if not tokens_per_s > 0 or workers < 1:
            raise ValueError(f"need a positive speed and at least one worker, got {tokens_per_s} tokens/s, "
                             f"{workers} workers")
        raw = self._record(keys=[keys.throughput()],
                           args=[self._field(accelerator, base_model), repr(tokens_per_s / workers), EWMA_WEIGHT])
        return MeasuredThroughput.model_validate_json(raw)

    def get(self, accelerator: str, base_model: str) -> MeasuredThroughput | None:
        """The mean for this base model on this accelerator kind; None until a job on it has finished."""
        raw = self.redis.hget(keys.throughput(), self._field(accelerator, base_model))
        return None if raw is None else MeasuredThroughput.model_validate_json(raw)


def record_job_throughput(client: redis.Redis, settings: Settings, base_model: str, *,
                          tokens_per_s: float | None, workers: int) -> None:
    """Called once a job has succeeded: fold its training loop's tokens/s (its last metrics row) into
    the mean. A run without a measured speed (resumed with no step left) records nothing, and a Redis
    error only costs this sample: the job's success is already recorded."""
    if not tokens_per_s or tokens_per_s <= 0:
        return
    try:
        ThroughputStore(client).record(accelerator_kind(settings), base_model, tokens_per_s=float(tokens_per_s),
                                       workers=max(1, workers))
    except redis.RedisError as e:
        logger.warning("training speed of a finished job on %s not recorded: %s", base_model, e)
