"""The speed benchmark's figure titles fit their figures (the mnist5k-128 title was cut at both edges)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.speed.plots import wrapped  # noqa: E402

TITLE = ("mnist5k-128: MNIST 4500 digits, 500 held out, 128 px (32x32 latents), class-conditional; 375 training-s "
         "per run (own process CPU time), evaluated every 50 s; seeds [0, 1, 2]")


def test_a_wrapped_title_keeps_every_word_and_its_line_breaks():
    text = wrapped(TITLE + "\nheld-out loss per noise level", 8)
    assert text.split() == (TITLE + " held-out loss per noise level").split()
    assert text.endswith("\nheld-out loss per noise level")
    assert len(text.splitlines()) == 3


def test_each_line_of_a_wrapped_title_fits_the_figure_it_is_drawn_on():
    for inches in (8, 6.4, 13.6):
        fig = plt.figure(figsize=(inches, 4), dpi=110)
        renderer = fig.canvas.get_renderer()
        for line in wrapped(TITLE, inches).splitlines():
            drawn = fig.text(0.5, 0.5, line, fontsize=9, ha="center")
            assert drawn.get_window_extent(renderer).width < fig.bbox.width, (inches, line)
        if inches == 8:  # the curves figure, where the title was cut: unwrapped it does not fit
            unwrapped = fig.text(0.5, 0.5, TITLE, fontsize=9, ha="center")
            assert unwrapped.get_window_extent(renderer).width > fig.bbox.width
        plt.close(fig)
