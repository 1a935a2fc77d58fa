"""What the node accepts back from a training child: the child runs a stranger's code, so every
answer is checked against the task that was sent before any of it is used or published.

Checked: the answer's fields and their types; the parameter names, shapes and dtypes against
the model that was sent (`extra` and `local_state` the same way); all floating tensors finite;
`n_samples` a positive int no bigger than the dataset; metrics finite floats with short plain
names; timings finite and non-negative; error texts bounded. Any violation is an
`AnswerRefused` with the first reason found.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from common.codec import as_float, dtype_name, is_floating, is_torch, same_kind
from common.training.catalog import SCAFFOLD_PREFIX

MAX_N_SAMPLES = 10**9  # when the dataset's own size is not known
MAX_METRICS = 256
MAX_TEXT = 20_000
METRIC_NAME = re.compile(r"[A-Za-z0-9_.:/\-]{1,128}")
LOCAL_STATE_KEYS = frozenset({"c", "x", "u"})  # SCAFFOLD's c_i, ADMM's x_i and u_i
RESULT_FIELDS = frozenset({"ok", "params", "n_samples", "metrics", "timings", "steps", "extra", "local_state"})


class AnswerRefused(ValueError):
    """The child's answer does not fit the task; the message says what is wrong."""


def _tensor(name: str, value: Any) -> Any:
    if not isinstance(value, np.ndarray) and not is_torch(value):
        raise AnswerRefused(f"{name} is a {type(value).__name__}, not a tensor")
    return value


def check_tensors(what: str, got: Any, like: dict[str, Any], *, all_names: bool) -> dict[str, Any]:
    """`got` as tensors with the names (all of them if `all_names`), shapes and dtypes of `like`
    (torch tensors or tensors held as numpy, `common.codec.TorchArray`: the node needs no torch)."""
    if not isinstance(got, dict):
        raise AnswerRefused(f"{what} is a {type(got).__name__}, not a mapping of tensors")
    unknown = [k for k in got if k not in like]
    if unknown:
        raise AnswerRefused(f"{what} has names the model does not: {sorted(map(str, unknown))[:5]}")
    missing = [k for k in like if k not in got]
    if all_names and missing:
        raise AnswerRefused(f"{what} lacks {sorted(missing)[:5]}")
    out: dict[str, Any] = {}
    for name, value in got.items():
        tensor, ref = _tensor(f"{what} {name}", value), like[name]
        if tuple(tensor.shape) != tuple(ref.shape):
            raise AnswerRefused(f"{what} {name} has shape {tuple(tensor.shape)}, the model {tuple(ref.shape)}")
        try:
            got_dtype = dtype_name(tensor)
        except TypeError as exc:
            raise AnswerRefused(f"{what} {name}: {exc}") from None
        if got_dtype != dtype_name(ref):
            raise AnswerRefused(f"{what} {name} has dtype torch.{got_dtype}, the model torch.{dtype_name(ref)}")
        if is_floating(tensor) and not bool(np.isfinite(as_float(tensor)).all()):
            raise AnswerRefused(f"{what} {name} is not finite (NaN or Inf)")
        out[name] = same_kind(tensor, ref)
    return out


def _count(name: str, value: Any, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        raise AnswerRefused(f"{name} must be an int in [{low}, {high}], got {value!r:.40}")
    return value


def _floats(what: str, value: Any, *, non_negative: bool = False) -> dict[str, float]:
    if not isinstance(value, dict) or len(value) > MAX_METRICS:
        raise AnswerRefused(f"{what} must be a mapping of at most {MAX_METRICS} names to numbers")
    out: dict[str, float] = {}
    for key, number in value.items():
        if not isinstance(key, str) or not METRIC_NAME.fullmatch(key):
            raise AnswerRefused(f"{what} has a metric name that is not 1-128 of [A-Za-z0-9_.:/-]: {key!r:.60}")
        if type(number) not in (int, float) or not math.isfinite(number) or (non_negative and number < 0):
            raise AnswerRefused(f"{what} {key} is not a finite{' non-negative' if non_negative else ''} number: "
                                f"{number!r:.40}")
        out[key] = float(number)
    return out


def check_failure(answer: dict[str, Any]) -> tuple[str, str]:
    """(error, traceback) of an answer with ok false, as bounded text."""
    error, trace = answer.get("error", "unknown error"), answer.get("traceback") or ""
    if not isinstance(error, str) or not isinstance(trace, str):
        raise AnswerRefused("a failure's error and traceback must be text")
    return error[:MAX_TEXT], trace[:MAX_TEXT]


def check_result(answer: Any, params: dict[str, Any], max_samples: int | None = None) -> dict[str, Any]:
    """A successful round's answer, checked against the `params` that were sent; AnswerRefused."""
    if not isinstance(answer, dict) or answer.get("ok") is not True:
        raise AnswerRefused("the answer is not a result")
    unknown = set(answer) - RESULT_FIELDS
    if unknown:
        raise AnswerRefused(f"unknown fields {sorted(map(str, unknown))[:5]}")
    floats = {k: v for k, v in params.items() if is_floating(v)}
    extra_like = {SCAFFOLD_PREFIX + k: v for k, v in floats.items()}
    local_state = answer.get("local_state") or {}
    if not isinstance(local_state, dict) or not set(local_state) <= LOCAL_STATE_KEYS:
        raise AnswerRefused(f"local_state must map {sorted(LOCAL_STATE_KEYS)} to tensors")
    checked = {
        "params": check_tensors("params", answer.get("params"), params, all_names=True),
        "n_samples": _count("n_samples", answer.get("n_samples"), 1, max_samples or MAX_N_SAMPLES),
        "metrics": _floats("metrics", answer.get("metrics", {})),
        "timings": _floats("timings", answer.get("timings", {}), non_negative=True),
        "steps": _count("steps", answer.get("steps", 0), 0, 2**62),
        "extra": check_tensors("extra", answer.get("extra") or {}, extra_like, all_names=False),
        "local_state": {k: check_tensors(f"local_state {k}", v, floats, all_names=False) for k, v in local_state.items()},
    }
    for what, key in (("metrics", "train_loss"), ("timings", "train_s")):
        if key not in checked[what]:
            raise AnswerRefused(f"{what} lacks {key}")
    return checked


STATISTICS_FIELDS = frozenset({"ok", "n", "sum", "sumsq", "min", "max", "hist", "suppressed_cells"})


def _finite_list(what: str, value: Any, length: int | None, max_length: int) -> list[float]:
    if not isinstance(value, list) or not 1 <= len(value) <= max_length or (length is not None and len(value) != length):
        raise AnswerRefused(f"{what} must be a list of {length or f'1 to {max_length}'} numbers")
    if not all(type(v) in (int, float) and math.isfinite(v) for v in value):
        raise AnswerRefused(f"{what} holds a value that is not a finite number")
    return [float(v) for v in value]


def _histograms(value: Any, features: int, bins: int, rows: int, min_cell: int) -> list[list[int]]:
    """Counts: `features` lists of `bins` ints in [0, rows], none in (0, min_cell) (suppressed)."""
    if not isinstance(value, list) or len(value) != features:
        raise AnswerRefused(f"hist must hold one histogram per feature ({features})")
    for counts in value:
        if not isinstance(counts, list) or len(counts) != bins or not all(type(c) is int and 0 <= c <= rows for c in counts):
            raise AnswerRefused(f"each histogram must be {bins} counts in [0, {rows}]")
        if any(0 < c < min_cell for c in counts):
            raise AnswerRefused(f"a histogram cell counts fewer than {min_cell} patients and was not suppressed")
    return value


def check_statistics(answer: Any, *, bins: int, min_rows: int, max_rows: int, policy: Any) -> dict[str, Any]:
    """A statistics child's answer, checked against the request and the site's StatisticsPolicy:
    counts in range, finite floats of one length, no extremes unless allowed, suppressed cells."""
    if not isinstance(answer, dict) or answer.get("ok") is not True:
        raise AnswerRefused("the answer is not a result")
    if unknown := set(answer) - STATISTICS_FIELDS:
        raise AnswerRefused(f"unknown fields {sorted(map(str, unknown))[:5]}")
    n = _count("n", answer.get("n"), min_rows, max_rows)
    out: dict[str, Any] = {"n": n, "sum": _finite_list("sum", answer.get("sum"), None, policy.max_features)}
    features = len(out["sum"])
    out["sumsq"] = _finite_list("sumsq", answer.get("sumsq"), features, features)
    if any(v < 0 for v in out["sumsq"]):
        raise AnswerRefused("a sum of squares is negative")
    extremes = [k for k in ("min", "max") if k in answer]
    if extremes and policy.extremes != "exact":
        raise AnswerRefused("the answer holds extremes this site does not send")
    for key in extremes:
        out[key] = _finite_list(key, answer[key], features, features)
    if bins:
        out["hist"] = _histograms(answer.get("hist"), features, bins, n, policy.min_cell_count)
        out["suppressed_cells"] = _count("suppressed_cells", answer.get("suppressed_cells"), 0, features * bins)
    elif "hist" in answer:
        raise AnswerRefused("the answer holds histograms that were not asked for")
    return out
