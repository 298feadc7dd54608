"""The pattern store: every calibrated task's per-layer expert scores, for one model.

Layout of a store directory::

    manifest.json                    format, version, model fingerprint, one entry per task
    tasks/<task>-<sha8>.safetensors  "scores" [L, E], "mean.<stat>" [L, E] per-expert means and
                                     "sig.<source>.<stat>" [M, E] retrieval keys (premoe.moe.signature)
    signatures.safetensors           cache: every task's keys stacked, rebuilt when tasks change
    refits/<task>-<key8>/            optional (``premoe refit``): the re-fitted down projections of the
                                     experts one keep count keeps for the task, one safetensors file per
                                     MoE layer, keyed in the manifest by the kept set's digest
    .lock                            serialises concurrent manifest updates

The manifest is the single source of truth and is replaced atomically (write to a temporary file,
then ``os.replace``) after the task file (or re-fit directory) it points to is complete, so an
interrupted calibration leaves the store exactly as it was; recalibrating a task drops its re-fits. A
store belongs to one model (checked by its fingerprint, :class:`Fingerprint`). Only JSON and
safetensors are ever read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from premoe._version import __version__
from premoe.errors import InputError, StoreError

STORE_FORMAT = "premoe-pattern-store"
STORE_VERSION = 1
MANIFEST = "manifest.json"
SIGNATURE_CACHE = "signatures.safetensors"
TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


class Fingerprint(Protocol):
    """A model's identity as a store records it (the MoE and dense models each have one)."""

    def to_dict(self) -> dict[str, Any]: ...

    def differences(self, stored: dict[str, Any]) -> list[str]:
        """What differs from the model the store recorded (empty: the same model)."""


def model_kind(model: dict[str, Any]) -> str:
    """``"dense"`` or ``"moe"`` for a store's record of its model."""
    return model.get("kind") or ("moe" if model.get("num_experts") else "dense")


def check_task_name(name: str) -> str:
    if not isinstance(name, str) or not TASK_NAME.match(name):
        raise InputError(f"invalid task name {name!r}: use letters, digits, '_', '-' or '.' (up to 128 characters)")
    return name


@dataclass
class TaskPattern:
    """One task's calibration result. Rows of ``scores`` follow ``layers`` (decoder-layer ids)."""

    name: str
    layers: list[int]
    scores: torch.Tensor
    means: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    signature: dict[str, torch.Tensor] = field(default_factory=dict)  # "<source>.<stat>" -> [M, E]

    @property
    def scorer(self) -> str:
        return self.info.get("scorer", "?")

    def as_stored(self) -> TaskPattern:
        """This pattern as the store holds it (float32 tensors): what :meth:`PatternStore.load` would return."""
        return TaskPattern(
            self.name,
            list(self.layers),
            self.scores.float(),
            {k: v.float() for k, v in self.means.items()},
            dict(self.info),
            {k: v.float() for k, v in self.signature.items()},
        )

    def summary(self) -> str:
        """One line: what the calibration recorded."""
        info = self.info
        if info.get("kind") == "dense":
            what = f"{info['signature']['layers']} decoder layers (dense: head and FFN-channel statistics)"
        else:
            what = f"{len(self.layers)} MoE layers"
        how = ", streamed layer by layer" if info.get("streamed") else ""
        return (
            f"calibrated task {self.name!r} ({self.scorer}): {info.get('samples')} samples, {info.get('tokens')} "
            f"tokens, {what}{how}"
        )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json_atomic(path: Path, obj: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _locked(directory: Path):
    """Serialise manifest updates between processes (POSIX advisory lock; no-op elsewhere)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(directory / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class PatternStore:
    """A directory of per-task expert patterns for one model."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    @classmethod
    def open(cls, path: str | Path) -> "PatternStore":
        """Open an existing store.

        Raises:
            StoreError: no store there, or its manifest is corrupt.
        """
        store = cls(path)
        if not store.exists():
            if store.path.is_dir() and any(store.path.iterdir()):
                raise StoreError(f"{store.path} is not a premoe pattern store (no {MANIFEST})")
            raise StoreError(
                f"no pattern store at {store.path}; create one with `premoe calibrate --store {store.path} ...`"
            )
        store.manifest()  # validate now
        return store

    def manifest(self) -> dict[str, Any]:
        try:
            m = json.loads(self.manifest_path.read_text())
        except FileNotFoundError:
            raise StoreError(f"no pattern store at {self.path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise StoreError(
                f"corrupt store manifest {self.manifest_path} ({e}); restore it or recalibrate into a new `store`"
            ) from None
        if not isinstance(m, dict) or m.get("format") != STORE_FORMAT:
            raise StoreError(f"{self.manifest_path} is not a premoe pattern-store manifest")
        if m.get("version") != STORE_VERSION:
            raise StoreError(
                f"{self.path}: store version {m.get('version')} is not supported by this premoe (wants {STORE_VERSION})"
            )
        if not isinstance(m.get("tasks"), dict) or not isinstance(m.get("model"), dict):
            raise StoreError(f"corrupt store manifest {self.manifest_path}: missing model or tasks")
        return m

    @property
    def kind(self) -> str:
        """``"dense"`` or ``"moe"``: the kind of model the store was built for (older dense stores record no
        kind, and no experts)."""
        return model_kind(self.model)

    @property
    def model(self) -> dict[str, Any]:
        """The record of the model the store was built for (its fingerprint's ``to_dict()``)."""
        return self.manifest()["model"]

    @property
    def tasks(self) -> dict[str, dict[str, Any]]:
        return self.manifest()["tasks"]

    def check_model(self, fingerprint: Fingerprint) -> None:
        """Raise :class:`StoreError` unless the store was built for this model."""
        try:
            diff = fingerprint.differences(self.model)
        except (TypeError, KeyError, ValueError, AttributeError) as e:
            raise StoreError(f"corrupt store manifest {self.manifest_path}: bad model record ({e})") from None
        if diff:
            raise StoreError(
                f"pattern store {self.path} was built for another model ({'; '.join(diff)}); "
                "use the model it was calibrated on, or calibrate into a new `store`"
            )

    def check_new_task(self, fingerprint: Fingerprint, task: str, overwrite: bool) -> None:
        """Before calibrating ``task`` into this store (which may not exist yet): the store is this
        model's, and the task is new unless ``overwrite``."""
        if self.exists():
            self.check_model(fingerprint)
            if task in self.tasks and not overwrite:
                raise StoreError(f"task {task!r} already exists in {self.path}; pass `overwrite` to replace it")

    def load(self, task: str) -> TaskPattern:
        """Load one task's pattern (integrity-checked against the manifest)."""
        tasks = self.tasks
        if task not in tasks:
            known = ", ".join(sorted(tasks)) or "none yet"
            raise StoreError(f"task {task!r} is not in store {self.path} (tasks: {known}); calibrate it first")
        entry = tasks[task]
        file = self.path / entry["file"]
        if not file.is_file():
            raise StoreError(f"store file {file} is missing; recalibrate task {task!r}")
        if entry.get("sha256") and _sha256(file) != entry["sha256"]:
            raise StoreError(f"store file {file} is corrupt (checksum mismatch); recalibrate task {task!r}")
        try:
            tensors = load_file(file)
        except (SafetensorError, OSError) as e:
            raise StoreError(f"store file {file} is corrupt ({e}); recalibrate task {task!r}") from None
        means = {k.removeprefix("mean."): v for k, v in tensors.items() if k.startswith("mean.")}
        sig = {k.removeprefix("sig."): v for k, v in tensors.items() if k.startswith("sig.")}
        model = self.model
        layers = [int(x) for x in model.get("moe_layers") or ()]
        scores = tensors.get("scores")
        if scores is None or tuple(scores.shape) != (len(layers), int(model.get("num_experts") or 0)):
            raise StoreError(f"store file {file} does not match the store's model; recalibrate task {task!r}")
        return TaskPattern(task, layers, scores, means, dict(entry), sig)

    def signature_table(self, key: str) -> tuple[list[str], torch.Tensor]:
        """Every task's retrieval key ``key`` ("<source>.<stat>") stacked: (names, [T, M, E]).

        Served from the ``signatures.safetensors`` cache; tasks added or replaced since it was
        written are read from their files and the cache is rewritten atomically (skipped if the
        store is read-only), so adding one task to a large store costs one file read.

        Raises:
            StoreError: the store has no tasks, or a task lacks the key.
        """
        tasks = self.tasks
        if not tasks:
            raise StoreError(f"store {self.path} has no tasks; calibrate at least one with `premoe calibrate`")
        names = sorted(tasks)
        wanted = [[n, tasks[n]["file"]] for n in names]
        cache = self.path / SIGNATURE_CACHE
        cached: dict[tuple[str, str], int] = {}
        old: dict[str, torch.Tensor] = {}
        if cache.is_file():
            try:
                with safe_open(cache, "pt") as f:
                    entries = json.loads(f.metadata().get("tasks", "[]"))
                    if entries == wanted and key in f.keys():
                        return names, f.get_tensor(key)
                    old = {k: f.get_tensor(k) for k in f.keys()}
                cached = {(n, file): i for i, (n, file) in enumerate(entries)}
            except (SafetensorError, OSError, json.JSONDecodeError, ValueError):
                cached, old = {}, {}
        rows: dict[str, list[torch.Tensor]] = {}
        for n, file in wanted:
            i = cached.get((n, file)) if key in old else None
            sig = {k: v[i] for k, v in old.items()} if i is not None else self.load(n).signature
            if key not in sig:
                raise StoreError(
                    f"task {n!r} in {self.path} has no retrieval key {key!r}; recalibrate it with this premoe"
                )
            for k, v in sig.items():
                rows.setdefault(k, []).append(v)
        stacked = {
            k: torch.stack(v) for k, v in rows.items() if len(v) == len(names) and len({t.shape for t in v}) == 1
        }
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(prefix=".signatures.", suffix=".tmp", dir=self.path)
            os.close(fd)
            save_file(stacked, tmp, metadata={"tasks": json.dumps(wanted)})
            os.replace(tmp, cache)
        except OSError:
            if tmp:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
        return names, stacked[key]

    def add(self, pattern: TaskPattern, fingerprint: Fingerprint, overwrite: bool = False) -> None:
        """Add (or with ``overwrite`` replace) a task, atomically. Creates the store if needed.

        Raises:
            StoreError: the store belongs to another model, or the task exists and not ``overwrite``.
        """
        check_task_name(pattern.name)
        kept = pattern.as_stored()
        tensors = {"scores": kept.scores.contiguous()}
        tensors.update({f"mean.{k}": v.contiguous() for k, v in kept.means.items()})
        tensors.update({f"sig.{k}": v.contiguous() for k, v in kept.signature.items()})
        if self.exists():
            self._add_existing(pattern, tensors, fingerprint, overwrite)
            return
        if self.path.exists() and (not self.path.is_dir() or any(self.path.iterdir())):
            raise StoreError(f"{self.path} exists and is not a premoe pattern store; choose another `store`")
        # New store: build it beside the target, then rename into place in one step.
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent))
        try:
            (tmp / ".lock").touch()
            entry = _write_task_file(tmp, pattern, tensors)
            _write_json_atomic(
                tmp / MANIFEST,
                {
                    "format": STORE_FORMAT,
                    "version": STORE_VERSION,
                    "premoe_version": __version__,
                    "model": fingerprint.to_dict(),
                    "tasks": {pattern.name: entry},
                },
            )
            if self.path.is_dir():  # an empty directory the user made
                self.path.rmdir()
            os.rename(tmp, self.path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _add_existing(self, pattern: TaskPattern, tensors, fingerprint, overwrite: bool) -> None:
        with _locked(self.path):
            self.check_model(fingerprint)
            manifest = self.manifest()
            old = manifest["tasks"].get(pattern.name)
            if old is not None and not overwrite:
                raise StoreError(f"task {pattern.name!r} already exists in {self.path}; pass `overwrite` to replace it")
            entry = _write_task_file(self.path, pattern, tensors)
            try:
                manifest["tasks"][pattern.name] = entry
                _write_json_atomic(self.manifest_path, manifest)
            except BaseException:
                with contextlib.suppress(OSError):
                    (self.path / entry["file"]).unlink()
                raise
            if old is not None and old.get("file") != entry["file"]:
                with contextlib.suppress(OSError):
                    (self.path / old["file"]).unlink()
            for r in (old or {}).get("refits", {}).values():  # fitted to the old pattern's kept sets
                shutil.rmtree(self.path / r["dir"], ignore_errors=True)

    # -- re-fitted rows ---------------------------------------------------------------------------

    def refit_workdir(self) -> Path:
        """A fresh directory inside the store to write a re-fit into before :meth:`add_refit` (removed
        by it, or by the caller on failure)."""
        (self.path / "refits").mkdir(exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=".refit.", suffix=".tmp", dir=self.path / "refits"))

    def add_refit(self, task: str, key: str, meta: dict[str, Any], directory: Path) -> None:
        """Record ``directory`` (from :meth:`refit_workdir`, complete) as ``task``'s re-fit for the kept
        set with digest ``key``, replacing any earlier one; ``meta`` goes into the manifest."""
        files = {f.name: f.stat().st_size for f in sorted(Path(directory).glob("*.safetensors"))}
        rel = f"refits/{task}-{key[:8]}"
        with _locked(self.path):
            manifest = self.manifest()
            entry = manifest["tasks"].get(task)
            if entry is None:
                raise StoreError(f"task {task!r} is not in store {self.path}; calibrate it first")
            final, stale = self.path / rel, self.path / "refits" / f".{task}-{key[:8]}.old"
            shutil.rmtree(stale, ignore_errors=True)
            if final.exists():  # an earlier re-fit of the same kept set: replaced
                os.replace(final, stale)
            os.rename(directory, final)
            entry.setdefault("refits", {})[key] = {**meta, "dir": rel, "files": files}
            _write_json_atomic(self.manifest_path, manifest)
            shutil.rmtree(stale, ignore_errors=True)

    def refit_dir(self, task: str, key: str) -> tuple[Path, dict[str, Any]] | None:
        """``task``'s stored re-fit for the kept set with digest ``key``: (its directory, its manifest
        entry), or ``None`` when there is none.

        Raises:
            StoreError: the manifest lists it but its files are missing or truncated.
        """
        entry = self.tasks.get(task, {}).get("refits", {}).get(key)
        if entry is None:
            return None
        d = self.path / entry["dir"]
        for name, size in entry.get("files", {}).items():
            f = d / name
            if not f.is_file() or f.stat().st_size != size:
                raise StoreError(
                    f"store re-fit file {f} is missing or truncated; rerun `premoe refit` for task {task!r} "
                    "or pass `refit=False`"
                )
        return d, entry


def _write_task_file(root: Path, pattern: TaskPattern, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    (root / "tasks").mkdir(exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{pattern.name}.", suffix=".tmp", dir=root / "tasks")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"task": pattern.name, "format": "premoe-pattern"})
        digest = _sha256(Path(tmp))
        rel = f"tasks/{pattern.name}-{digest[:8]}.safetensors"
        os.replace(tmp, root / rel)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    entry = {k: v for k, v in pattern.info.items() if k not in ("file", "sha256", "refits")}
    entry.update(file=rel, sha256=digest)
    entry.setdefault("created", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    return entry
