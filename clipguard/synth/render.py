"""Procedural images of the synthetic world: class icons in a named colour, size, count and
position over a named background texture.

Drawn at 4x and box-downsampled, so that a 13 px icon keeps a readable, anti-aliased silhouette.
Every icon is built in a unit box (u right, v down); the parts in the attribute colour carry a
dark outline, fixed-colour details (wheels, windows, spots) make the classes tell apart.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from clipguard.synth.vocabulary import BACKGROUNDS, CLASSES, COLOURS, Attributes, sample_attributes

RGB = tuple[int, int, int]
DARK: RGB = (35, 35, 38)
LIGHT: RGB = (246, 246, 240)
SKIN: RGB = (236, 196, 160)
POT: RGB = (96, 96, 104)
SCREEN: RGB = (30, 42, 60)

SUPERSAMPLE = 4
MIN_IMAGE_SIZE = 32
MAX_IMAGE_SIZE = 256
# Icon side as a fraction of the image side; three large icons in a row just fit.
# Icons fill a third to nearly half of the side: at 64 px with 8 px patches the class must be
# legible to a tiny ViT, or every class-level attack and metric is noise (measured: with 0.23 /
# 0.34 a clean model's sheep->aeroplane Hit@10 equalled the random-text baseline).
SIZE_FRACTION = {"small": 0.30, "large": 0.44}
# Where a group is centred and along which axis its icons line up.
POSITION_LAYOUT = {
    "left": (0.25, 0.5, "vertical"),
    "right": (0.75, 0.5, "vertical"),
    "top": (0.5, 0.25, "horizontal"),
    "bottom": (0.5, 0.75, "horizontal"),
    "centre": (0.5, 0.5, "horizontal"),
}


@dataclass(frozen=True)
class Pen:
    """Draws one icon: unit-box coordinates mapped to canvas pixels, mirrored when flip."""

    draw: ImageDraw.ImageDraw
    x0: float
    y0: float
    size: float
    flip: bool
    body: RGB
    shade: RGB

    @property
    def outline(self) -> int:
        return max(1, round(self.size * 0.045))

    def xy(self, u: float, v: float) -> tuple[float, float]:
        if self.flip:
            u = 1.0 - u
        return (self.x0 + u * self.size, self.y0 + v * self.size)

    def box(self, u0: float, v0: float, u1: float, v1: float) -> list[float]:
        (a, b), (c, d) = self.xy(u0, v0), self.xy(u1, v1)
        return [min(a, c), min(b, d), max(a, c), max(b, d)]

    def polygon(self, points: Sequence[tuple[float, float]], fill: RGB) -> None:
        self.draw.polygon(
            [self.xy(u, v) for u, v in points], fill=fill, outline=DARK, width=self.outline
        )

    def ellipse(self, u0: float, v0: float, u1: float, v1: float, fill: RGB) -> None:
        self.draw.ellipse(self.box(u0, v0, u1, v1), fill=fill, outline=DARK, width=self.outline)

    def rect(self, u0: float, v0: float, u1: float, v1: float, fill: RGB, radius: float = 0.0):
        self.draw.rounded_rectangle(
            self.box(u0, v0, u1, v1),
            radius=radius * self.size,
            fill=fill,
            outline=DARK,
            width=self.outline,
        )

    def line(self, points: Sequence[tuple[float, float]], fill: RGB, width: float) -> None:
        self.draw.line(
            [self.xy(u, v) for u, v in points],
            fill=fill,
            width=max(1, round(width * self.size)),
            joint="curve",
        )

    def outlined_line(self, points: Sequence[tuple[float, float]], fill: RGB, width: float):
        self.line(points, DARK, width + 0.09)
        self.line(points, fill, width)

    def ring(self, u0: float, v0: float, u1: float, v1: float, fill: RGB, width: float) -> None:
        self.draw.ellipse(self.box(u0, v0, u1, v1), outline=fill, width=round(width * self.size))

    def blob(self, circles: Sequence[tuple[float, float, float]], fill: RGB) -> None:
        """Union of circles with one outer contour (outlines first, then fills on top)."""
        pad = self.outline / self.size
        for u, v, r in circles:
            self.draw.ellipse(self.box(u - r - pad, v - r - pad, u + r + pad, v + r + pad), DARK)
        for u, v, r in circles:
            self.draw.ellipse(self.box(u - r, v - r, u + r, v + r), fill)


def _leaf(base: tuple[float, float], tip: tuple[float, float], width: float) -> list:
    (bu, bv), (tu, tv) = base, tip
    mu, mv = (bu + tu) / 2, (bv + tv) / 2
    du, dv = tu - bu, tv - bv
    length = max(1e-6, (du * du + dv * dv) ** 0.5)
    nu, nv = -dv / length * width, du / length * width
    return [base, (mu + nu, mv + nv), tip, (mu - nu, mv - nv)]


def _draw_aeroplane(p: Pen) -> None:
    p.polygon([(0.42, 0.46), (0.30, 0.03), (0.45, 0.03), (0.64, 0.46)], p.body)
    p.polygon([(0.42, 0.54), (0.30, 0.97), (0.45, 0.97), (0.64, 0.54)], p.body)
    p.polygon([(0.08, 0.47), (0.0, 0.24), (0.09, 0.24), (0.2, 0.47)], p.body)
    p.polygon([(0.08, 0.53), (0.0, 0.76), (0.09, 0.76), (0.2, 0.53)], p.body)
    p.ellipse(0.03, 0.40, 0.99, 0.60, p.body)
    p.ellipse(0.80, 0.45, 0.91, 0.55, DARK)


def _draw_bicycle(p: Pen) -> None:
    p.ring(0.0, 0.46, 0.44, 0.90, DARK, 0.08)
    p.ring(0.56, 0.46, 1.0, 0.90, DARK, 0.08)
    rear, pedal, front = (0.22, 0.68), (0.48, 0.68), (0.78, 0.68)
    seat, head = (0.38, 0.30), (0.74, 0.30)
    p.outlined_line([rear, pedal, head, seat, rear], p.body, 0.1)
    p.outlined_line([seat, pedal], p.body, 0.1)
    p.outlined_line([head, front], p.body, 0.08)
    p.rect(0.28, 0.22, 0.46, 0.30, DARK, radius=0.03)
    p.line([(0.66, 0.16), (0.74, 0.22), (0.74, 0.30)], DARK, 0.07)


def _draw_bird(p: Pen) -> None:
    p.line([(0.40, 0.74), (0.37, 0.97)], DARK, 0.05)
    p.line([(0.52, 0.74), (0.54, 0.97)], DARK, 0.05)
    p.polygon([(0.24, 0.52), (0.0, 0.36), (0.04, 0.66)], p.shade)
    p.ellipse(0.12, 0.38, 0.74, 0.80, p.body)
    p.polygon([(0.86, 0.28), (1.0, 0.37), (0.86, 0.44)], DARK)
    p.ellipse(0.58, 0.18, 0.90, 0.50, p.body)
    p.ellipse(0.72, 0.27, 0.79, 0.34, DARK)
    p.polygon([(0.28, 0.56), (0.48, 0.08), (0.64, 0.54)], p.shade)


def _draw_boat(p: Pen) -> None:
    p.line([(0.5, 0.03), (0.5, 0.64)], DARK, 0.05)
    p.polygon([(0.46, 0.05), (0.46, 0.58), (0.08, 0.58)], p.body)
    p.polygon([(0.55, 0.14), (0.55, 0.58), (0.88, 0.58)], LIGHT)
    p.polygon([(0.0, 0.62), (1.0, 0.62), (0.82, 0.9), (0.14, 0.9)], p.body)
    p.rect(0.1, 0.66, 0.9, 0.72, p.shade)


def _draw_bottle(p: Pen) -> None:
    p.rect(0.40, 0.07, 0.60, 0.32, p.body)
    p.polygon([(0.28, 0.44), (0.42, 0.26), (0.58, 0.26), (0.72, 0.44)], p.body)
    p.rect(0.28, 0.38, 0.72, 0.98, p.body, radius=0.08)
    p.rect(0.28, 0.56, 0.72, 0.78, LIGHT)
    p.rect(0.38, 0.0, 0.62, 0.09, DARK)


def _draw_bus(p: Pen) -> None:
    p.rect(0.0, 0.18, 1.0, 0.80, p.body, radius=0.07)
    for u in (0.05, 0.25, 0.45, 0.65):
        p.rect(u, 0.27, u + 0.15, 0.48, LIGHT)
    p.rect(0.86, 0.27, 0.97, 0.56, LIGHT)
    p.rect(0.0, 0.58, 0.86, 0.64, p.shade)
    p.ellipse(0.10, 0.66, 0.30, 0.92, DARK)
    p.ellipse(0.68, 0.66, 0.88, 0.92, DARK)


def _draw_car(p: Pen) -> None:
    p.polygon([(0.20, 0.50), (0.32, 0.22), (0.68, 0.22), (0.82, 0.50)], p.body)
    p.polygon([(0.30, 0.48), (0.37, 0.29), (0.48, 0.29), (0.48, 0.48)], LIGHT)
    p.polygon([(0.53, 0.48), (0.53, 0.29), (0.65, 0.29), (0.73, 0.48)], LIGHT)
    p.rect(0.02, 0.46, 0.98, 0.76, p.body, radius=0.08)
    p.ellipse(0.11, 0.60, 0.35, 0.84, DARK)
    p.ellipse(0.65, 0.60, 0.89, 0.84, DARK)
    p.ellipse(0.19, 0.68, 0.27, 0.76, LIGHT)
    p.ellipse(0.73, 0.68, 0.81, 0.76, LIGHT)


def _draw_cat(p: Pen) -> None:
    p.outlined_line([(0.70, 0.92), (0.90, 0.84), (0.96, 0.62)], p.body, 0.08)
    p.ellipse(0.18, 0.46, 0.80, 0.99, p.body)
    p.polygon([(0.22, 0.30), (0.22, 0.0), (0.46, 0.14)], p.body)
    p.polygon([(0.78, 0.30), (0.78, 0.0), (0.54, 0.14)], p.body)
    p.ellipse(0.20, 0.08, 0.80, 0.56, p.body)
    p.ellipse(0.32, 0.24, 0.43, 0.35, DARK)
    p.ellipse(0.57, 0.24, 0.68, 0.35, DARK)
    p.polygon([(0.46, 0.40), (0.54, 0.40), (0.50, 0.45)], DARK)


def _draw_chair(p: Pen) -> None:
    p.rect(0.18, 0.56, 0.33, 0.99, p.body)
    p.rect(0.70, 0.56, 0.85, 0.99, p.body)
    p.rect(0.16, 0.0, 0.40, 0.62, p.body, radius=0.04)
    p.rect(0.16, 0.46, 0.87, 0.64, p.body)


def _draw_cow(p: Pen) -> None:
    for u in (0.18, 0.31, 0.60, 0.72):
        p.rect(u, 0.58, u + 0.09, 0.94, p.body)
        p.rect(u, 0.88, u + 0.09, 0.96, DARK)
    p.line([(0.12, 0.36), (0.04, 0.62)], DARK, 0.04)
    p.rect(0.10, 0.28, 0.84, 0.68, p.body, radius=0.08)
    p.ellipse(0.22, 0.34, 0.42, 0.50, DARK)
    p.ellipse(0.52, 0.46, 0.68, 0.62, DARK)
    p.polygon([(0.82, 0.20), (0.78, 0.06), (0.86, 0.18)], LIGHT)
    p.polygon([(0.94, 0.20), (0.98, 0.06), (0.90, 0.18)], LIGHT)
    p.rect(0.76, 0.16, 1.0, 0.48, p.body, radius=0.05)
    p.rect(0.84, 0.38, 1.0, 0.48, SKIN, radius=0.03)


def _draw_diningtable(p: Pen) -> None:
    p.rect(0.06, 0.36, 0.21, 0.98, p.body)
    p.rect(0.79, 0.36, 0.94, 0.98, p.body)
    p.rect(0.06, 0.40, 0.94, 0.54, p.shade)
    p.rect(0.0, 0.24, 1.0, 0.44, p.body)
    p.ellipse(0.16, 0.15, 0.44, 0.26, LIGHT)
    p.rect(0.62, 0.04, 0.72, 0.26, LIGHT)


def _draw_dog(p: Pen) -> None:
    p.outlined_line([(0.22, 0.46), (0.12, 0.28), (0.06, 0.12)], p.body, 0.07)
    for u in (0.22, 0.33, 0.56, 0.66):
        p.rect(u, 0.56, u + 0.09, 0.88, p.body)
    p.ellipse(0.14, 0.36, 0.78, 0.68, p.body)
    p.ellipse(0.58, 0.14, 0.88, 0.46, p.body)
    p.ellipse(0.78, 0.28, 1.0, 0.46, p.body)
    p.ellipse(0.93, 0.29, 1.0, 0.36, DARK)
    p.polygon([(0.62, 0.18), (0.72, 0.16), (0.72, 0.46), (0.60, 0.40)], DARK)
    p.ellipse(0.76, 0.22, 0.81, 0.27, DARK)


def _draw_horse(p: Pen) -> None:
    p.polygon([(0.16, 0.38), (0.02, 0.52), (0.04, 0.80), (0.18, 0.50)], DARK)
    for u in (0.20, 0.30, 0.62, 0.72):
        p.rect(u, 0.52, u + 0.06, 0.97, p.body)
        p.rect(u, 0.92, u + 0.06, 0.99, DARK)
    p.ellipse(0.12, 0.30, 0.80, 0.62, p.body)
    p.polygon([(0.60, 0.44), (0.70, 0.10), (0.86, 0.12), (0.82, 0.46)], p.body)
    p.polygon([(0.68, 0.08), (0.84, 0.0), (1.0, 0.22), (0.94, 0.30), (0.78, 0.22)], p.body)
    p.polygon([(0.63, 0.40), (0.69, 0.06), (0.74, 0.07), (0.69, 0.42)], DARK)


def _draw_motorbike(p: Pen) -> None:
    p.ellipse(0.0, 0.50, 0.36, 0.86, DARK)
    p.ellipse(0.64, 0.50, 1.0, 0.86, DARK)
    p.ellipse(0.13, 0.63, 0.23, 0.73, LIGHT)
    p.ellipse(0.77, 0.63, 0.87, 0.73, LIGHT)
    p.line([(0.74, 0.34), (0.82, 0.68)], DARK, 0.06)
    p.polygon(
        [(0.12, 0.58), (0.24, 0.32), (0.64, 0.26), (0.84, 0.50), (0.64, 0.68), (0.30, 0.70)],
        p.body,
    )
    p.ellipse(0.40, 0.18, 0.68, 0.40, p.body)
    p.rect(0.16, 0.24, 0.42, 0.32, DARK, radius=0.03)
    p.line([(0.70, 0.40), (0.74, 0.16), (0.64, 0.14)], DARK, 0.06)
    p.ellipse(0.80, 0.26, 0.90, 0.36, LIGHT)


def _draw_person(p: Pen) -> None:
    p.rect(0.35, 0.60, 0.47, 0.99, DARK)
    p.rect(0.53, 0.60, 0.65, 0.99, DARK)
    p.outlined_line([(0.33, 0.34), (0.17, 0.64)], p.body, 0.09)
    p.outlined_line([(0.67, 0.34), (0.83, 0.64)], p.body, 0.09)
    p.polygon([(0.28, 0.30), (0.72, 0.30), (0.67, 0.66), (0.33, 0.66)], p.body)
    p.ellipse(0.37, 0.01, 0.63, 0.29, SKIN)


def _draw_pottedplant(p: Pen) -> None:
    base = (0.5, 0.62)
    for tip, width in (((0.02, 0.26), 0.15), ((0.98, 0.26), 0.15), ((0.24, 0.0), 0.14),
                       ((0.76, 0.0), 0.14), ((0.5, 0.0), 0.13)):  # fmt: skip
        p.polygon(_leaf(base, tip, width), p.body)
    p.polygon([(0.30, 0.64), (0.70, 0.64), (0.64, 0.99), (0.36, 0.99)], POT)
    p.rect(0.26, 0.60, 0.74, 0.68, POT)


def _draw_sheep(p: Pen) -> None:
    for u in (0.28, 0.40, 0.58, 0.70):
        p.rect(u, 0.62, u + 0.07, 0.96, DARK)
    circles = [(0.22, 0.50, 0.15), (0.36, 0.36, 0.16), (0.54, 0.34, 0.16), (0.68, 0.46, 0.15),
               (0.56, 0.62, 0.15), (0.38, 0.62, 0.15), (0.46, 0.48, 0.2)]  # fmt: skip
    p.blob(circles, p.body)
    p.ellipse(0.74, 0.30, 0.98, 0.58, DARK)
    p.ellipse(0.70, 0.30, 0.80, 0.38, DARK)


def _draw_sofa(p: Pen) -> None:
    p.rect(0.08, 0.80, 0.16, 0.95, DARK)
    p.rect(0.84, 0.80, 0.92, 0.95, DARK)
    p.rect(0.10, 0.20, 0.90, 0.62, p.body, radius=0.06)
    p.rect(0.08, 0.52, 0.92, 0.84, p.body, radius=0.04)
    p.line([(0.5, 0.54), (0.5, 0.70)], p.shade, 0.04)
    p.rect(0.0, 0.38, 0.17, 0.84, p.body, radius=0.06)
    p.rect(0.83, 0.38, 1.0, 0.84, p.body, radius=0.06)


def _draw_train(p: Pen) -> None:
    p.line([(0.0, 0.93), (1.0, 0.93)], DARK, 0.04)
    p.rect(0.0, 0.34, 0.46, 0.80, p.body)
    p.rect(0.05, 0.42, 0.19, 0.56, LIGHT)
    p.rect(0.26, 0.42, 0.40, 0.56, LIGHT)
    p.rect(0.44, 0.66, 0.52, 0.72, DARK)
    p.rect(0.84, 0.20, 0.93, 0.46, DARK)
    p.rect(0.50, 0.44, 1.0, 0.80, p.body, radius=0.04)
    p.rect(0.50, 0.20, 0.70, 0.80, p.body)
    p.rect(0.48, 0.15, 0.72, 0.21, DARK)
    p.rect(0.54, 0.28, 0.66, 0.42, LIGHT)
    for u in (0.10, 0.34, 0.62, 0.88):
        p.ellipse(u - 0.08, 0.74, u + 0.08, 0.90, DARK)


def _draw_tvmonitor(p: Pen) -> None:
    p.rect(0.44, 0.72, 0.56, 0.88, DARK)
    p.rect(0.26, 0.86, 0.74, 0.96, p.body, radius=0.03)
    p.rect(0.0, 0.06, 1.0, 0.78, p.body, radius=0.06)
    p.rect(0.17, 0.21, 0.83, 0.63, SCREEN)
    p.polygon([(0.22, 0.26), (0.40, 0.26), (0.25, 0.45)], (90, 110, 140))


ICON_DRAWERS: dict[str, Callable[[Pen], None]] = {
    "aeroplane": _draw_aeroplane,
    "bicycle": _draw_bicycle,
    "bird": _draw_bird,
    "boat": _draw_boat,
    "bottle": _draw_bottle,
    "bus": _draw_bus,
    "car": _draw_car,
    "cat": _draw_cat,
    "chair": _draw_chair,
    "cow": _draw_cow,
    "diningtable": _draw_diningtable,
    "dog": _draw_dog,
    "horse": _draw_horse,
    "motorbike": _draw_motorbike,
    "person": _draw_person,
    "pottedplant": _draw_pottedplant,
    "sheep": _draw_sheep,
    "sofa": _draw_sofa,
    "train": _draw_train,
    "tvmonitor": _draw_tvmonitor,
}


def _jittered_colour(colour_name: str, rng: np.random.Generator) -> RGB:
    base = np.array(COLOURS[colour_name]) + rng.integers(-12, 13, size=3)
    return tuple(int(c) for c in np.clip(base, 0, 255))


def _draw_background(draw: ImageDraw.ImageDraw, side: int, kind: str, rng: np.random.Generator):
    grey = int(rng.integers(196, 236))
    base = tuple(int(c) for c in np.clip(grey + rng.integers(-10, 11, size=3), 0, 255))
    ink = tuple(c - int(rng.integers(38, 58)) for c in base)
    draw.rectangle([0, 0, side, side], fill=base)
    period = side * float(rng.uniform(0.10, 0.15))
    phase = float(rng.uniform(0, period))
    steps = int(side / period) + 3
    if kind == "striped":
        width = max(1, round(period * 0.4))
        direction = int(rng.integers(4))
        for i in range(-steps, 2 * steps):
            t = phase + i * period
            if direction == 0:
                draw.line([(0, t), (side, t)], fill=ink, width=width)
            elif direction == 1:
                draw.line([(t, 0), (t, side)], fill=ink, width=width)
            else:
                end = (t + side, side) if direction == 2 else (t - side, side)
                draw.line([(t, 0), end], fill=ink, width=width)
    elif kind == "dotted":
        radius = period * 0.2
        for i in range(-1, steps):
            for j in range(-1, steps):
                x, y = phase + i * period, phase + j * period
                draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=ink)
    elif kind == "checkered":
        cell = period * 1.25
        for i in range(-1, int(side / cell) + 2):
            for j in range(-1, int(side / cell) + 2):
                if (i + j) % 2 == 0:
                    x, y = phase + i * cell, phase + j * cell
                    draw.rectangle([x, y, x + cell, y + cell], fill=ink)
    elif kind == "wavy":
        xs = np.linspace(0, side, 33)
        amplitude, wavelength = period * 0.3, period * 2.5
        for i in range(-1, steps):
            ys = phase + i * period + amplitude * np.sin(2 * np.pi * xs / wavelength)
            points = list(zip(xs.tolist(), ys.tolist()))
            draw.line(points, fill=ink, width=max(1, round(period * 0.22)))
    elif kind != "plain":
        raise ValueError(f"unknown background {kind!r}; known: {', '.join(BACKGROUNDS)}")


@dataclass(frozen=True)
class IconPlacement:
    x0: float
    y0: float
    size: float
    flip: bool


def _layout(attributes: Attributes, side: int, rng: np.random.Generator) -> list[IconPlacement]:
    centre_u, centre_v, axis = POSITION_LAYOUT[attributes.position]
    icon = SIZE_FRACTION[attributes.size] * side * float(rng.uniform(0.93, 1.05))
    margin = 0.02 * side
    n = attributes.count
    spacing = min(1.12 * icon, (side - icon - 2 * margin) / (n - 1)) if n > 1 else 0.0
    cx = (centre_u + float(rng.uniform(-0.04, 0.04))) * side
    cy = (centre_v + float(rng.uniform(-0.04, 0.04))) * side
    placements = []
    for i in range(n):
        along = (i - (n - 1) / 2) * spacing
        across = float(rng.uniform(-0.03, 0.03)) * side
        x, y = (cx + along, cy + across) if axis == "horizontal" else (cx + across, cy + along)
        x0 = float(np.clip(x - icon / 2, margin, side - margin - icon))
        y0 = float(np.clip(y - icon / 2, margin, side - margin - icon))
        placements.append(IconPlacement(x0, y0, icon, flip=bool(rng.random() < 0.5)))
    return placements


def render_image(
    class_name: str, attributes: Attributes, rng: np.random.Generator, image_size: int = 64
) -> Image.Image:
    """An RGB image of `attributes.count` icons of the class, as the attributes say."""
    if class_name not in ICON_DRAWERS:
        raise ValueError(f"unknown class {class_name!r}; known: {', '.join(CLASSES)}")
    if not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
        raise ValueError(
            f"image_size must be in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}], got {image_size}"
        )
    side = image_size * SUPERSAMPLE
    image = Image.new("RGB", (side, side))
    draw = ImageDraw.Draw(image)
    _draw_background(draw, side, attributes.background, rng)
    body = _jittered_colour(attributes.colour, rng)
    shade = tuple(int(c * 0.72) for c in body)
    for place in _layout(attributes, side, rng):
        pen = Pen(draw, place.x0, place.y0, place.size, place.flip, body, shade)
        ICON_DRAWERS[class_name](pen)
    return image.reduce(SUPERSAMPLE)


def render_contact_sheet(
    path: str | Path, per_class: int = 6, image_size: int = 64, seed: int = 0, scale: int = 2
) -> Path:
    """A PNG grid, one row per class, random attributes: for looking at the world by eye."""
    rng = np.random.default_rng(seed)
    cell = image_size * scale
    sheet = Image.new("RGB", (cell * per_class, cell * len(CLASSES)), (255, 255, 255))
    for row, class_name in enumerate(CLASSES):
        for col in range(per_class):
            image = render_image(class_name, sample_attributes(rng), rng, image_size)
            enlarged = image.resize((cell, cell), Image.Resampling.NEAREST)
            sheet.paste(enlarged, (col * cell, row * cell))
    path = Path(path)
    sheet.save(path)
    return path
