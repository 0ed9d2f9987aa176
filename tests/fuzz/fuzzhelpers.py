"""What the fuzz tests share: the example budgets, the "named error" rule, a hang guard and the counts.

A fuzz property holds when a reader, given a mutated file, ends in one of two ways:

* the same result as for the clean file (or, where the mutation legitimately changes the content,
  a result that passes the reader's own invariants), or
* a **named error**: an exception of one of the package's own error classes for that surface
  (:data:`NAMED_ERRORS`) whose message names the file (or its folder) the user handed over.

Anything else fails the property: a bare ``KeyError``/``TypeError``/``struct.error``/``UnicodeDecodeError``,
a library's internal error, an error of the right class that does not say which file, an example
running longer than :data:`HANG_SECONDS` (a hang), or a marker file written by a pickle payload
(code execution).

Budgets: each test asks :func:`budget` for its share; the ``ci`` profile (the default, what CI runs)
uses it as is, ``ASCOOD_FUZZ_PROFILE=long`` multiplies it by 20 (docs/FUZZING.md).
"""
from __future__ import annotations

import collections
import contextlib
import os
import signal
import tempfile

from hypothesis import HealthCheck, settings
from hypothesis.configuration import set_hypothesis_home_dir

from ascood.data.datasets import DataError
from ascood.deploy.state import ArtifactError
from ascood.training.checkpoint import CheckpointError

PROFILE = os.environ.get("ASCOOD_FUZZ_PROFILE", "ci")
_SCALE = {"ci": 1, "long": 20}
if PROFILE not in _SCALE:
    raise RuntimeError(f"ASCOOD_FUZZ_PROFILE must be one of {sorted(_SCALE)}, got {PROFILE!r}")

#: Seconds one example may take before it counts as a hang (generous: 2 shared CPU cores in CI).
HANG_SECONDS = 20

# Hypothesis keeps caches (Unicode tables, constants) in ./.hypothesis even without an example database:
# put them in the temporary folder, so a test run writes nothing into the clone.
set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), "ascood-hypothesis"))

# Reproducible in CI (same examples every run, derandomize), nothing written into the clone (database=None),
# no per-example deadline (the hang guard below is the time limit: a shared CI core is sometimes slow).
for _name, _scale in _SCALE.items():
    settings.register_profile(_name, derandomize=True, database=None, deadline=None, print_blob=True,
                              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                                     HealthCheck.data_too_large, HealthCheck.filter_too_much])
settings.load_profile(PROFILE)

#: The package's named errors per surface (subclasses included: OpenOODTreeError is a DataError).
NAMED_ERRORS = {
    "image list": (DataError,),
    "detector": (ArtifactError,),
    "checkpoint": (CheckpointError, FileNotFoundError),
    # Trainer(resume=...) also refuses a checkpoint of other settings: "cannot resume PATH: ..." (ValueError).
    "resume": (CheckpointError, FileNotFoundError, ValueError),
}

#: Examples run per property (its name -> count), printed in pytest's terminal summary (conftest.py).
COUNTS: collections.Counter = collections.Counter()
#: (property, "ok" or "refused") -> count: how many examples ended in a result and in a named error.
OUTCOMES: collections.Counter = collections.Counter()
_CURRENT: list[str] = [""]


def budget(n: int) -> int:
    """Examples for a test whose CI share is ``n`` (times 20 under the long profile)."""
    return n * _SCALE[PROFILE]


def count(test_id: str) -> None:
    """Record one example run by ``test_id`` (its outcome, from :func:`outcome`, is recorded under it too)."""
    COUNTS[test_id] += 1
    _CURRENT[0] = test_id


class PropertyFailure(AssertionError):
    """The reader ended in neither the clean result nor a named error."""


class Hang(PropertyFailure):
    """An example ran longer than HANG_SECONDS."""


@contextlib.contextmanager
def hang_guard(seconds: int = HANG_SECONDS):
    """Fail with :class:`Hang` when the block runs longer than ``seconds`` (SIGALRM; main thread, POSIX)."""
    fired = []

    def on_alarm(signum, frame):
        fired.append(True)
        raise Hang(f"the reader ran longer than {seconds} s (a hang)")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    if fired:  # the reader caught the Hang (an ``except Exception`` inside it) and carried on or re-raised
        raise Hang(f"the reader ran longer than {seconds} s (a hang)")


def check_named(err: BaseException, surface: str, *names: str) -> None:
    """Fail unless ``err`` is one of ``surface``'s named errors and its message contains one of ``names``."""
    if isinstance(err, Hang):
        raise err
    if not isinstance(err, NAMED_ERRORS[surface]):
        raise PropertyFailure(f"{surface} reader raised a bare {type(err).__module__}.{type(err).__name__}: "
                              f"{str(err)[:300]}") from err
    text = str(err)
    if not any(n and n in text for n in names):
        raise PropertyFailure(f"{surface} reader raised {type(err).__name__} without naming the file "
                              f"({' or '.join(map(repr, names))}): {text[:300]}") from err
    if "Traceback (most recent call last)" in text:
        raise PropertyFailure(f"{surface} reader's message carries a traceback: {text[:300]}") from err


def outcome(read, surface: str, *names: str):
    """``("ok", result)`` when ``read()`` returns, ``("error", err)`` for a named error; else PropertyFailure."""
    with hang_guard():
        try:
            result = read()
        except PropertyFailure:
            raise
        except Exception as err:  # noqa: BLE001 - the property is exactly about which exceptions escape
            check_named(err, surface, *names)
            OUTCOMES[_CURRENT[0], "refused"] += 1
            return "error", err
    OUTCOMES[_CURRENT[0], "ok"] += 1
    return "ok", result


def byte_mutations(max_at: int, inserts=None, max_delete: int = 64):
    """A hypothesis strategy of one ``(kind, at, arg)`` edit for :func:`mutate_bytes`: a flipped, inserted
    (``inserts``, default any 1-8 bytes), deleted or cut byte run at an offset below ``max_at``."""
    from hypothesis import strategies as st

    at = st.integers(0, max_at)
    return st.one_of(
        st.tuples(st.just("flip"), at, st.integers(1, 255)),
        st.tuples(st.just("insert"), at, inserts if inserts is not None else st.binary(min_size=1, max_size=8)),
        st.tuples(st.just("delete"), at, st.integers(1, max_delete)),
        st.tuples(st.just("truncate"), at, st.just(0)),
    )


def mutate_bytes(data: bytes, mutations) -> bytes:
    """``data`` after each ``(kind, at, arg)`` of ``mutations``: flip (xor a byte with arg), insert (the bytes
    arg), delete (arg bytes) or truncate, at offset ``at`` taken modulo the current length (so one strategy
    serves files of any size)."""
    buf = bytearray(data)
    for kind, at, arg in mutations:
        at = at % (len(buf) + 1)
        if kind == "flip" and buf:
            buf[at % len(buf)] ^= arg
        elif kind == "insert":
            buf[at:at] = arg
        elif kind == "delete":
            del buf[at:at + arg]
        elif kind == "truncate":
            del buf[at:]
    return bytes(buf)


def edit_tree(tree, path: tuple, action: str, value) -> None:
    """Edit a nested dict/list ``tree`` (a checkpoint's dict, a parsed JSON file) in place at ``path``:
    ``replace`` the value, ``delete`` it, ``add`` a sibling (``KEY_extra`` in a dict, appended to a list),
    ``wrap`` it in a list, or ``stringify`` it (its JSON text). Tuples on the way become lists."""
    import json

    parent = tree
    for k in path[:-1]:
        if isinstance(parent[k], tuple):
            parent[k] = list(parent[k])
        parent = parent[k]
    key = path[-1]
    if action == "replace":
        parent[key] = value
    elif action == "delete":
        del parent[key]
    elif action == "add" and isinstance(parent, dict):
        parent[f"{key}_extra"] = value
    elif action == "add":
        parent.append(value)
    elif action == "wrap":
        parent[key] = [parent[key]]
    elif action == "stringify":
        parent[key] = json.dumps(parent[key])
