"""The Typer app: one thin command per pipeline stage (parse, call one library function, report)."""

from __future__ import annotations

import importlib
import sys
import warnings

import typer

from latentpatch.errors import Notice, UserError

app = typer.Typer(
    name="latentpatch",
    help="Patch Diffusion in the latent space of a pretrained VAE: encode images, patch-train, sample.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Each module defines `register(app)`; the order is the order of the pipeline.
COMMAND_MODULES = ("train_vae", "encode", "train", "ema", "sample", "eval", "export", "demo")

for _name in COMMAND_MODULES:
    importlib.import_module(f"latentpatch.cli.{_name}").register(app)


def _show_warning(message, category, filename, lineno, file=None, line=None, _default=warnings.showwarning):
    """The library's notices as one `warning: ...` line in the tool's words; other warnings as Python shows them."""
    if issubclass(category, Notice):
        typer.secho(f"warning: {message}", fg=typer.colors.YELLOW, err=True)
    else:
        _default(message, category, filename, lineno, file, line)


def main() -> None:
    """Console entry point: user errors print one clear line and exit 2, never a traceback."""
    warnings.showwarning = _show_warning
    try:
        app()
    except UserError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.secho("interrupted; finished work is kept and a rerun resumes", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
