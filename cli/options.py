"""The sampling options of the commands that sample (`sample`, `eval`), spelled once: SampleOptions' fields.

`with_sample_options` adds one `--flag` per field of latentpatch.sampling.options.SampleOptions (its default and
its help from the field) to a Typer command and hands the command one checked-form `options: SampleOptions`, so a
new option reaches every command that samples, with the same name, default and help.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from typing import Callable, Optional

import typer

from latentpatch.sampling.options import SampleOptions


def _flag(field: dataclasses.Field) -> str:
    return "--" + field.metadata.get("flag", field.name.replace("_", "-"))


def _parameter(field: dataclasses.Field) -> inspect.Parameter:
    """A Typer option for one SampleOptions field: --size is text on the command line (WxH or N)."""
    annotation = Optional[str] if field.name == "size" else field.type
    annotation = {"int": int, "float": float, "str": str, "str | None": Optional[str]}.get(annotation, annotation)
    option = typer.Option(field.default, _flag(field), help=field.metadata["help"])
    return inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)


def with_sample_options(command: Callable) -> Callable:
    """`command(..., options: SampleOptions)` as a Typer command with a flag per SampleOptions field."""
    from latentpatch.sampling.shape import parse_size

    fields = dataclasses.fields(SampleOptions)
    names = {f.name for f in fields}
    signature, hints = inspect.signature(command), typing.get_type_hints(command)
    kept = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in signature.parameters.values()
            if p.name != "options"]

    @functools.wraps(command)
    def wrapper(**kwargs):
        values = {name: kwargs.pop(name) for name in names}
        if values["size"] is not None:
            values["size"] = parse_size(values["size"])
        return command(options=SampleOptions(**values), **kwargs)

    parameters = kept + [_parameter(f) for f in fields]
    wrapper.__signature__ = signature.replace(parameters=parameters, return_annotation=None)
    wrapper.__annotations__ = {p.name: p.annotation for p in parameters}  # resolved types, as Typer reads them
    del wrapper.__wrapped__  # Typer reads the signature above, not the command's own
    return wrapper
