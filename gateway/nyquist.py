"""Nyquist plots of an impedance spectrum: as text for a terminal over SSH, and as a PNG file.

Both draw -Im Z over Re Z (milliohm) with equal scales on both axes, so arcs look like arcs:
the measured points, and the fitted model as a line. The PNG is written with the standard
library (zlib): an edge box should not need a plotting stack to show a technician a spectrum.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

Points = Sequence[float] | np.ndarray


def _frame(z_re: np.ndarray, z_im: np.ndarray, aspect: float) -> tuple[float, float, float, float]:
    """Axis limits (x0, x1, y0, y1) in milliohm with equal units per length, ``aspect`` = height/width."""
    x, y = z_re * 1e3, -z_im * 1e3
    y1 = max(0.0, float(np.max(y)))
    # the inductive tail (below the axis) can dwarf the arcs: show at most half their height of it
    y0 = min(0.0, float(np.min(y)))
    if y1 > 0:
        y0 = max(y0, -0.5 * y1)
    shown = y >= y0
    x0, x1 = float(np.min(x[shown])), float(np.max(x[shown]))
    span = max(x1 - x0, (y1 - y0) / aspect, 1e-9) * 1.05
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return cx - span / 2, cx + span / 2, cy - span * aspect / 2, cy + span * aspect / 2


def text_plot(z_re: Points, z_im: Points, fit_re: Points | None = None, fit_im: Points | None = None,
              width: int = 64, height: int = 20) -> list[str]:
    """Lines of a character plot: ``o`` measured, ``.`` fitted model, ``-`` the real axis."""
    re, im = np.asarray(z_re, dtype=float), np.asarray(z_im, dtype=float)
    ok = np.isfinite(re) & np.isfinite(im)
    if not ok.any():
        return ["(no finite points)"]
    # terminal cells are about twice as tall as wide
    x0, x1, y0, y1 = _frame(re[ok], im[ok], aspect=height * 2.0 / width)
    grid = [[" "] * width for _ in range(height)]

    def put(xs: np.ndarray, ys: np.ndarray, ch: str) -> None:
        cols = np.round((xs - x0) / (x1 - x0) * (width - 1)).astype(int)
        rows = np.round((y1 - ys) / (y1 - y0) * (height - 1)).astype(int)
        for c, r in zip(cols, rows, strict=True):
            if 0 <= c < width and 0 <= r < height and (ch == "o" or grid[r][c] == " "):
                grid[r][c] = ch

    axis = round(y1 / (y1 - y0) * (height - 1))
    if 0 <= axis < height:
        grid[axis] = ["-" if ch == " " else ch for ch in grid[axis]]
    if fit_re is not None and fit_im is not None:
        fr, fi = np.asarray(fit_re, dtype=float), np.asarray(fit_im, dtype=float)
        good = np.isfinite(fr) & np.isfinite(fi)
        put(fr[good] * 1e3, -fi[good] * 1e3, ".")
    put(re[ok] * 1e3, -im[ok] * 1e3, "o")
    lines = [f"-Im Z {y1:8.3f} mOhm |" + "".join(row) for row in grid[:1]]
    lines += [" " * 20 + "|" + "".join(row) for row in grid[1:-1]]
    lines += [f"      {y0:8.3f} mOhm |" + "".join(grid[-1])]
    lines.append(" " * 20 + "+" + "-" * width)
    lines.append(" " * 20 + f"{x0:<10.3f}" + "Re Z (mOhm)   o measured  . fit".center(width - 20) + f"{x1:>10.3f}")
    return lines


# -- PNG ---------------------------------------------------------------------------------------

# 3x5 glyphs: rows top to bottom, '#' set
_FONT = {
    "0": ["###", "#.#", "#.#", "#.#", "###"], "1": [".#.", "##.", ".#.", ".#.", "###"],
    "2": ["###", "..#", "###", "#..", "###"], "3": ["###", "..#", ".##", "..#", "###"],
    "4": ["#.#", "#.#", "###", "..#", "..#"], "5": ["###", "#..", "###", "..#", "###"],
    "6": ["###", "#..", "###", "#.#", "###"], "7": ["###", "..#", ".#.", ".#.", ".#."],
    "8": ["###", "#.#", "###", "#.#", "###"], "9": ["###", "#.#", "###", "..#", "###"],
    ".": ["...", "...", "...", "...", ".#."], "-": ["...", "...", "###", "...", "..."],
    " ": ["...", "...", "...", "...", "..."], "[": ["##.", "#..", "#..", "#..", "##."],
    "]": [".##", "..#", "..#", "..#", ".##"], "R": ["##.", "#.#", "##.", "#.#", "#.#"],
    "E": ["###", "#..", "##.", "#..", "###"], "Z": ["###", "..#", ".#.", "#..", "###"],
    "I": ["###", ".#.", ".#.", ".#.", "###"], "M": ["#.#", "###", "###", "#.#", "#.#"],
    "O": ["###", "#.#", "#.#", "#.#", "###"], "H": ["#.#", "#.#", "###", "#.#", "#.#"],
    "C": ["###", "#..", "#..", "#..", "###"], "L": ["#..", "#..", "#..", "#..", "###"],
    "D": ["##.", "#.#", "#.#", "#.#", "##."], "U": ["#.#", "#.#", "#.#", "#.#", "###"],
    "/": ["..#", "..#", ".#.", "#..", "#.."], "(": [".#.", "#..", "#..", "#..", ".#."],
    ")": [".#.", "..#", "..#", "..#", ".#."],
}


class _Canvas:
    def __init__(self, w: int, h: int) -> None:
        self.w, self.h = w, h
        self.px = np.full((h, w, 3), 255, dtype=np.uint8)

    def dot(self, x: float, y: float, color: tuple[int, int, int], r: int = 0) -> None:
        xi, yi = int(round(x)), int(round(y))
        for dy in range(-r, r + 1):
            for dx in range(-r, r + 1):
                if dx * dx + dy * dy <= r * r and 0 <= xi + dx < self.w and 0 <= yi + dy < self.h:
                    self.px[yi + dy, xi + dx] = color

    def line(self, x0: float, y0: float, x1: float, y1: float, color: tuple[int, int, int],
             box: tuple[float, float, float, float] | None = None) -> None:
        """A line, clipped to ``box`` (x0, y0, x1, y1; default the canvas) before it is rasterised:
        a point far off the frame costs no more than one across it."""
        seg = _clip((x0, y0, x1, y1), box or (0.0, 0.0, self.w - 1.0, self.h - 1.0))
        if seg is None:
            return
        x0, y0, x1, y1 = seg
        n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
        for t in np.linspace(0.0, 1.0, n + 1):
            self.dot(x0 + (x1 - x0) * t, y0 + (y1 - y0) * t, color)

    def text(self, x: int, y: int, s: str, scale: int = 2, color: tuple[int, int, int] = (0, 0, 0)) -> None:
        for k, ch in enumerate(s.upper()):
            glyph = _FONT.get(ch, _FONT[" "])
            for r, row in enumerate(glyph):
                for c, bit in enumerate(row):
                    if bit == "#":
                        x0, y0 = x + (k * 4 + c) * scale, y + r * scale
                        self.px[max(y0, 0):max(y0 + scale, 0), max(x0, 0):max(x0 + scale, 0)] = color

    def png(self) -> bytes:
        raw = b"".join(b"\x00" + self.px[y].tobytes() for y in range(self.h))

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def _clip(seg: tuple[float, float, float, float],
          box: tuple[float, float, float, float]) -> tuple[float, float, float, float] | None:
    """The part of a segment inside a box (Liang-Barsky), None when there is none."""
    if not all(math.isfinite(v) for v in seg):
        return None
    x0, y0, x1, y1 = seg
    dx, dy = x1 - x0, y1 - y0
    t0, t1 = 0.0, 1.0
    for p, q in ((-dx, x0 - box[0]), (dx, box[2] - x0), (-dy, y0 - box[1]), (dy, box[3] - y0)):
        if p == 0:
            if q < 0:  # parallel to this edge and outside it
                return None
        elif p < 0:
            t0 = max(t0, q / p)
        else:
            t1 = min(t1, q / p)
    if t0 > t1:
        return None
    return x0 + t0 * dx, y0 + t0 * dy, x0 + t1 * dx, y0 + t1 * dy


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    step = 10 ** math.floor(math.log10(max(hi - lo, 1e-12) / n))
    for m in (1, 2, 5, 10):
        if (hi - lo) / (step * m) <= n:
            step *= m
            break
    return [t for t in np.arange(math.ceil(lo / step) * step, hi + step * 1e-9, step).tolist()]


def write_png(path: str | Path, z_re: Points, z_im: Points, fit_re: Points | None = None,
              fit_im: Points | None = None, title: str = "", width: int = 720, height: int = 540) -> None:
    """A Nyquist plot as a PNG file: blue points measured, red line the fitted model."""
    re, im = np.asarray(z_re, dtype=float), np.asarray(z_im, dtype=float)
    ok = np.isfinite(re) & np.isfinite(im)
    if not ok.any():
        raise ValueError("no finite points to plot")
    left, right, top, bottom = 90, 20, 40, 60
    pw, ph = width - left - right, height - top - bottom
    x0, x1, y0, y1 = _frame(re[ok], im[ok], aspect=ph / pw)
    cv = _Canvas(width, height)

    def px(x: float, y: float) -> tuple[float, float]:
        return left + (x - x0) / (x1 - x0) * pw, top + (y1 - y) / (y1 - y0) * ph

    grey, black = (215, 215, 215), (0, 0, 0)
    for t in _ticks(x0, x1):
        gx, _ = px(t, 0)
        cv.line(gx, top, gx, top + ph, grey)
        cv.text(int(gx) - 12, top + ph + 8, f"{t:g}")
    for t in _ticks(y0, y1):
        _, gy = px(0, t)
        cv.line(left, gy, left + pw, gy, grey)
        cv.text(8, int(gy) - 5, f"{t:g}")
    _, ay = px(0, 0)
    cv.line(left, ay, left + pw, ay, black)
    cv.line(left, top, left, top + ph, black)
    cv.line(left, top + ph, left + pw, top + ph, black)
    cv.text(left + pw // 2 - 60, height - 22, "RE Z (MOHM)")
    cv.text(8, 12, "-IM Z (MOHM)  " + title)
    if fit_re is not None and fit_im is not None:
        fr, fi = np.asarray(fit_re, dtype=float) * 1e3, -np.asarray(fit_im, dtype=float) * 1e3
        pts = [px(x, y) for x, y in zip(fr, fi, strict=True) if math.isfinite(x) and math.isfinite(y)]
        for (ax, ay_), (bx, by) in zip(pts, pts[1:], strict=False):
            cv.line(ax, ay_, bx, by, (200, 30, 30), box=(left, top, left + pw, top + ph))
    for x, y in zip(re[ok] * 1e3, -im[ok] * 1e3, strict=True):
        cv.dot(*px(x, y), (30, 60, 200), r=3)
    Path(path).write_bytes(cv.png())
