"""Trace length before and after the search as one inline SVG histogram (no plotting library in the page).

Both series share the bins and the count axis, so the shift of the "after" bars to the left is the saving.
The SVG holds numbers and fixed labels only.
"""
from __future__ import annotations

import math
from typing import Sequence

WIDTH, HEIGHT = 390, 150
_LEFT, _RIGHT, _TOP, _BOTTOM = 44, 10, 22, 30
SERIES = (("before", "#8a9bb0"), ("after", "#e07b39"))


def bin_counts(values: Sequence[float], low: float, width: float, bins: int) -> list[int]:
  counts = [0] * bins
  for value in values:
    counts[min(bins - 1, max(0, int((value - low) / width)))] += 1
  return counts


def length_histogram_svg(before: Sequence[float], after: Sequence[float], bins: int = 30,
                         unit: str = "tokens") -> str:
  """Side-by-side bars per bin: trace length in `unit` before (grey-blue) and after (orange) the search."""
  low, high = min(min(before), min(after)), max(max(before), max(after))
  bins = max(1, min(bins, int(high - low) + 1))
  width = max(1.0, (high - low + 1) / bins)
  series = [bin_counts(values, low, width, bins) for values in (before, after)]
  top = max(max(counts) for counts in series)
  plot_w, plot_h = WIDTH - _LEFT - _RIGHT, HEIGHT - _TOP - _BOTTOM
  slot = plot_w / bins
  bars = []
  for index in range(bins):
    start = low + index * width
    for offset, ((name, colour), counts) in enumerate(zip(SERIES, series)):
      if not counts[index]:
        continue
      h = plot_h * counts[index] / top
      x = _LEFT + index * slot + offset * slot / 2
      bars.append(f'<rect class="bar-{name}" x="{x:.1f}" y="{_TOP + plot_h - h:.1f}" width="{max(slot / 2 - 0.5, 0.5):.1f}" '
                  f'height="{h:.1f}" fill="{colour}"><title>{name}: {counts[index]} traces of '
                  f'{math.floor(start)}-{math.floor(start + width)} {unit}</title></rect>')
  legend = "".join(f'<rect x="{_LEFT + 8 + i * 80}" y="6" width="10" height="10" fill="{colour}"/>'
                   f'<text x="{_LEFT + 22 + i * 80}" y="15">{name}</text>' for i, (name, colour) in enumerate(SERIES))
  axis = (f'<line x1="{_LEFT}" y1="{_TOP + plot_h}" x2="{WIDTH - _RIGHT}" y2="{_TOP + plot_h}" stroke="#555"/>'
          f'<text x="{_LEFT}" y="{HEIGHT - 14}">{math.floor(low)}</text>'
          f'<text x="{WIDTH - _RIGHT}" y="{HEIGHT - 14}" text-anchor="end">{math.floor(high)}</text>'
          f'<text x="{_LEFT + plot_w / 2}" y="{HEIGHT - 4}" text-anchor="middle">trace length ({unit})</text>'
          f'<text x="{_LEFT - 4}" y="{_TOP + 8}" text-anchor="end">{top}</text>'
          f'<text x="{_LEFT - 4}" y="{_TOP + plot_h}" text-anchor="end">0</text>')
  return (f'<svg class="histogram" role="img" aria-label="trace length before and after" width="{WIDTH}" '
          f'height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-size="11">{legend}{axis}{"".join(bars)}</svg>')
