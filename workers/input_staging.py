"""The dispatcher's side of a job's inputs: check the datasets, store their tokenization, name the keys.

The dispatcher downloads the datasets to its own work dir only to check them with the base model's
tokenizer (`check_and_store_datasets`); what the training workers read, they fetch themselves from the
object store (workers.job_inputs). The tokenization the checks produce is uploaded to
`tenants/<tid>/jobs/<job>/pretokenized/<digest>/<file>.tokens.npz`, where the digest covers everything
the examples depend on (the dataset's sha256, the tokenizer, the options: `PretokenizedKey`). Its content
follows from its key, so any attempt may write it without a fence, and a retry that finds it skips the
checks and the tokenization: it exists only once they passed. Retention removes it with the job's other
objects (fleet.retention, the job's prefix).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict

from fleet.exceptions import InvalidRequest, NotFound
from fleet.files import file_object_key
from fleet.jobs import Job
from fleet.objectstore import ObjectStore
from fleet.registry import AdapterRegistry
from fleet.settings import Settings
from workers.job_inputs import FILE_FIELDS, StoredInputs, StoredObject, stored_file
from workers.pretokenized import PretokenizedKey
from workers.spec import TrainingSpec

__all__ = ["check_and_store_datasets", "checkpoint_objects", "pretokenized_object_key", "stored_inputs",
           "version_objects"]

Say = Callable[[str, str], None]  # (level, message): a job event


def pretokenized_object_key(tenant_id: str, job_id: str, param: str, key: PretokenizedKey) -> str:
    """Where the tokenization of the job's `param` file under `key` is stored (see the module docstring)."""
    digest = hashlib.sha256(json.dumps(asdict(key), sort_keys=True).encode()).hexdigest()[:32]
    return f"tenants/{tenant_id}/jobs/{job_id}/pretokenized/{digest}/{param}.tokens.npz"


def check_and_store_datasets(job: Job, spec: TrainingSpec, store: ObjectStore, say: Say) -> dict[str, StoredObject]:
    """The checks that need the base model's tokenizer (the API checked the format at upload): chat
    template errors, token counts, examples over max_seq_len. Errors raise InvalidRequest with the file
    as `param` and the line numbers; warnings (e.g. truncated examples) are said as job events. Returns
    the stored tokenization of each file, as `pretokenized_<param>` → object."""
    from transformers import AutoTokenizer

    from workers.datasets import validate_dataset
    from workers.pretokenized import key_for, write_pretokenized

    tokenizer = AutoTokenizer.from_pretrained(str(spec.base_model))
    files = [("training_file", spec.training_file, 10), ("validation_file", spec.validation_file, 1)]
    stored: dict[str, StoredObject] = {}
    for param, path, min_examples in files:
        if path is None:
            continue
        key = key_for(path, tokenizer, max_seq_len=spec.max_seq_len, train_on_inputs=spec.train_on_inputs)
        object_key = pretokenized_object_key(job.tenant_id, job.id, param, key)
        field_name = f"pretokenized_{param}"
        if store.exists(object_key):
            say("info", f"{param}: checked and tokenized by an earlier attempt; reusing that.")
            stored[field_name] = stored_file(object_key, field_name)
            continue
        examples: list = []
        report = validate_dataset(path, tokenizer=tokenizer, max_seq_len=spec.max_seq_len,
                                  overflow="truncate", train_on_inputs=spec.train_on_inputs,
                                  min_examples=min_examples, examples_out=examples)
        if not report.ok:
            problems = "; ".join(str(issue) for issue in report.errors[:20])
            raise InvalidRequest(f"{param} {getattr(job, param)} is not usable for {job.model}: "
                                 f"{report.n_errors} problem(s): {problems}", param=param)
        for issue in report.warnings[:20]:
            say("warn", f"{param}: {issue}")
        if report.token_stats is not None:
            say("info", f"{param}: {report.summary().splitlines()[0]}")
        local = write_pretokenized(path.with_suffix(".tokens.npz"), examples, key)
        store.put_file(object_key, local)
        stored[field_name] = stored_file(object_key, field_name)
    return stored


def version_objects(registry: AdapterRegistry, tenant_id: str, ref: str) -> tuple[StoredObject, ...]:
    """The files of a published adapter version (PEFT layout), with the sha256 its manifest records."""
    manifest = registry.read_manifest(tenant_id, ref)
    prefix = registry.version_prefix(tenant_id, manifest.name, manifest.version)
    return tuple(StoredObject(key=prefix + entry.stored_at, path=entry.path, sha256=entry.sha256)
                 for entry in manifest.files)


def checkpoint_objects(store: ObjectStore, location: str) -> tuple[StoredObject, ...]:
    """The files of the checkpoint recorded at `location` (fleet.checkpoints); NotFound if none is there."""
    keys = store.list(location)
    if not keys:
        raise NotFound(f"Checkpoint {location!r} has no files in {store!r}.")
    return tuple(StoredObject(key=key, path=key[len(location):]) for key in keys)


def stored_inputs(settings: Settings, job: Job, spec: TrainingSpec, *, training_sha256: str,
                  validation_sha256: str | None, pretokenized: dict[str, StoredObject],
                  init_adapter: tuple[StoredObject, ...] = (),
                  resume_from: tuple[StoredObject, ...] = ()) -> StoredInputs:
    """The inputs the training workers fetch: `spec` (checked on the dispatcher, with its paths) minus
    its files, plus the object keys of the job's datasets, their tokenization, the adapter to continue
    from and the checkpoint to resume from."""
    files = {"training_file": stored_file(file_object_key(job.tenant_id, job.training_file), "training_file",
                                          training_sha256), **pretokenized}
    if job.validation_file:
        files["validation_file"] = stored_file(file_object_key(job.tenant_id, job.validation_file),
                                               "validation_file", validation_sha256)
    fields = spec.model_dump(mode="json", exclude=set(FILE_FIELDS))
    return StoredInputs(settings=settings, spec=fields, files=files, init_adapter=init_adapter,
                        resume_from=resume_from)
