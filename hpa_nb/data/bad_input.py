"""Bad input, named: one line that says which file and which image, or a counted skip.

Readers never let an error out without the file and the image ID in it. Inside a tf.data graph a
problem travels with its element as a string ("" when there is none), built with `join_text` and
`first_problem`; `SkipLog.keep` drops and logs it with ``skip_bad``, and `error_message` cleans
TensorFlow's own wording off an error that does escape.
"""

from __future__ import annotations

import logging
import re
from typing import Sequence

import tensorflow as tf

logger = logging.getLogger(__name__)


class SkipLog:
    """Counts images skipped as bad input and prints a warning line for each."""

    def __init__(self, echo: bool = True) -> None:
        self.problems: list[str] = []
        self.echo = echo

    @property
    def count(self) -> int:
        return len(self.problems)

    def add(self, problem: str) -> None:
        self.problems.append(problem)
        if self.echo:
            logger.warning(f"warning: skipped bad input #{self.count}: {problem}")

    def _add_tensor(self, problem: tf.Tensor) -> tf.Tensor:
        self.add(problem.numpy().decode("utf-8", "replace"))
        return tf.constant(False)

    def keep(self, problem: tf.Tensor) -> tf.Tensor:
        """A tf.data filter predicate: True when `problem` is empty, else log it and drop."""
        return tf.cond(
            tf.equal(problem, ""),
            lambda: tf.constant(True),
            lambda: tf.py_function(self._add_tensor, [problem], tf.bool),
        )


def skip_log(skip_bad: bool | SkipLog) -> SkipLog | None:
    if isinstance(skip_bad, SkipLog):
        return skip_bad
    return SkipLog() if skip_bad else None


# Node markers come as "[[{{node Assert}}]]", "[[IteratorGetNext]]" (Keras fit) or "[[node X (defined at ...) ]]".
_TF_NOISE = (
    re.compile(r"\{\{function_node [^}]*\}\}"),
    re.compile(r"\[\[[^\[\]]*\]\]"),
    re.compile(r"\[Op:[^\]]*\]( name: \S*)?"),
    re.compile(r"^.*assertion failed:\s*", re.S),
)


def error_message(exc: BaseException) -> str:
    """One clean line from a TensorFlow error: our own message without TensorFlow's node and op noise."""
    text = getattr(exc, "message", None) or str(exc)
    for pattern in _TF_NOISE:
        text = pattern.sub(" ", text)
    text = " ".join(text.split())
    if text.startswith("[") and text.endswith("]"):  # tf.debugging.Assert wraps its data in brackets, escaped
        text = text[1:-1].strip().replace("\\'", "'").replace('\\"', '"').replace("\\\\", "\\")
    return text or type(exc).__name__


def first_problem(checks: Sequence[tuple[tf.Tensor, tf.Tensor]]) -> tf.Tensor:
    """The message of the first failed check, or "" when all pass."""
    problem = tf.constant("")
    for failed, message in reversed(checks):
        problem = tf.where(failed, message, problem)
    return problem


def join_text(*parts: object) -> tf.Tensor:
    """Concatenate strings, string tensors and numbers (tensors or not) into one string tensor."""

    def text(part: object) -> object:
        if isinstance(part, tf.Tensor):
            return part if part.dtype == tf.string else tf.strings.as_string(part)
        return str(part)

    return tf.strings.join([text(part) for part in parts])
