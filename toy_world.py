"""The offline toy world: scenes of flat shapes and things, truthful captions, and unsafe twins.

Each scene holds one to three objects (a shape or a simple thing, a colour, a size, a position)
on a background, and its caption says exactly that: "a small red circle on the left and a blue
car on the right on grass". The unsafe twin is the same drawing plus a stand-in for a concept of
the item's category, and the same caption with a phrase naming it. Everything is large, flat
and distinctly coloured, so a small CLIP at 32-64 px can learn it in minutes on a CPU.

`generate_data.py --toy N` writes it out as a Safe-CLIP dataset; this module only samples,
words and draws scenes (standard library and Pillow only).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

from PIL import Image, ImageDraw

TOY_VERSION = "1"  # part of the recipe: bump when drawing or wording changes
SUPERSAMPLE = 2    # draw at twice the size and box-filter down: smooth edges, exact flat interiors

COLOURS = {
    "red": (220, 30, 30), "orange": (245, 140, 20), "yellow": (245, 220, 30),
    "green": (40, 170, 60), "blue": (30, 70, 220), "purple": (140, 50, 190),
    "pink": (245, 120, 190), "brown": (130, 80, 35), "black": (20, 20, 20),
    "white": (250, 250, 250), "grey": (128, 128, 128), "cyan": (40, 200, 220),
}


@dataclass(frozen=True)
class Background:
    phrases: tuple[str, ...]   # how a caption names it
    hidden: frozenset          # object colours that would not stand out on it


BACKGROUNDS = {
    "sky": Background(("in the sky", "against a blue sky"), frozenset({"blue", "cyan", "white"})),
    "grass": Background(("on grass", "on a green lawn"), frozenset({"green"})),
    "sand": Background(("on sand", "on a sandy beach"), frozenset({"yellow", "orange"})),
    "room": Background(("in a grey room", "indoors"), frozenset({"grey"})),
    "night": Background(("at night", "under a night sky"), frozenset({"black", "blue"})),
    "snow": Background(("on snow", "in the snow"), frozenset({"white", "grey"})),
    "water": Background(("on water", "on the sea"), frozenset({"blue", "cyan"})),
    "wood": Background(("on a wooden floor", "on wooden planks"), frozenset({"brown", "orange"})),
}

# Positions are centres in [0, 1]^2; three objects sit further apart than one or two.
POSITIONS = {"left": "on the left", "right": "on the right", "top": "at the top",
             "bottom": "at the bottom", "center": "in the center"}
LAYOUTS = {
    1: (("left",), ("right",), ("top",), ("bottom",), ("center",)),
    2: (("left", "right"), ("top", "bottom")),
    3: (("left", "center", "right"), ("top", "center", "bottom")),
}
SIZES = {1: {"small": 0.26, "medium": 0.36, "large": 0.5},    # box side, as a share of the image
         2: {"small": 0.24, "medium": 0.32, "large": 0.42},
         3: {"small": 0.2, "medium": 0.26}}

# Fixed colours of the parts of composite things (the named colour is always the largest part).
TRUNK, DOOR, WINDOW, WHEEL = (100, 65, 30), (70, 45, 30), (190, 220, 240), (30, 30, 30)
MAST, SAIL, STEM, PISTIL = (80, 60, 40), (245, 245, 235), (40, 130, 40), (250, 200, 50)
STRING, EYE, PUPIL = (90, 90, 90), (240, 240, 240), (5, 5, 5)


def _box_px(box, canvas: int) -> tuple[float, float, float, float]:
    return tuple(v * canvas for v in box)


def _pts(box, *uv) -> list[tuple[float, float]]:
    """Map points given in a box's own unit square to pixels."""
    x0, y0, x1, y1 = box
    return [(x0 + u * (x1 - x0), y0 + v * (y1 - y0)) for u, v in uv]


def _sub(box, u0, v0, u1, v1) -> list[float]:
    """A sub-box given in the box's own unit square."""
    (a, b), (c, d) = _pts(box, (u0, v0), (u1, v1))
    return [a, b, c, d]


def _bar(p0, p1, w0, w1) -> list[tuple[float, float]]:
    """A straight bar from p0 to p1, half as wide as w0 at p0 and w1 at p1 (tapers allowed)."""
    (x0, y0), (x1, y1) = p0, p1
    length = math.hypot(x1 - x0, y1 - y0) or 1.0
    nx, ny = (y0 - y1) / length, (x1 - x0) / length
    return [(x0 + nx * w0, y0 + ny * w0), (x1 + nx * w1, y1 + ny * w1),
            (x1 - nx * w1, y1 - ny * w1), (x0 - nx * w0, y0 - ny * w0)]


def _darker(colour, factor=0.65):
    return tuple(int(v * factor) for v in colour)


# Shapes and things: each draws itself into a pixel box with its named colour.

def _circle(d, b, c):
    d.ellipse(b, fill=c)


def _square(d, b, c):
    d.rectangle(_sub(b, 0.08, 0.08, 0.92, 0.92), fill=c)


def _triangle(d, b, c):
    d.polygon(_pts(b, (0.5, 0.03), (0.98, 0.95), (0.02, 0.95)), fill=c)


def _star(d, b, c):
    points = []
    for k in range(10):
        r = 0.5 if k % 2 == 0 else 0.24
        angle = -math.pi / 2 + k * math.pi / 5
        points.append((0.5 + r * math.cos(angle), 0.53 + r * math.sin(angle)))
    d.polygon(_pts(b, *points), fill=c)


def _heart(d, b, c):
    d.ellipse(_sub(b, 0.02, 0.06, 0.54, 0.56), fill=c)
    d.ellipse(_sub(b, 0.46, 0.06, 0.98, 0.56), fill=c)
    d.polygon(_pts(b, (0.05, 0.4), (0.95, 0.4), (0.5, 0.97)), fill=c)


def _diamond(d, b, c):
    d.polygon(_pts(b, (0.5, 0.0), (0.92, 0.5), (0.5, 1.0), (0.08, 0.5)), fill=c)


def _cross(d, b, c):
    d.rectangle(_sub(b, 0.34, 0.02, 0.66, 0.98), fill=c)
    d.rectangle(_sub(b, 0.02, 0.34, 0.98, 0.66), fill=c)


def _ring(d, b, c):
    d.ellipse(b, outline=c, width=max(2, round(0.2 * (b[2] - b[0]))))


def _house(d, b, c):
    d.rectangle(_sub(b, 0.12, 0.45, 0.88, 0.98), fill=c)
    d.polygon(_pts(b, (0.02, 0.48), (0.5, 0.04), (0.98, 0.48)), fill=_darker(c))
    d.rectangle(_sub(b, 0.42, 0.68, 0.58, 0.98), fill=DOOR)


def _tree(d, b, c):
    d.rectangle(_sub(b, 0.41, 0.55, 0.59, 0.99), fill=TRUNK)
    d.ellipse(_sub(b, 0.08, 0.01, 0.92, 0.7), fill=c)


def _car(d, b, c):
    d.polygon(_pts(b, (0.2, 0.46), (0.3, 0.16), (0.7, 0.16), (0.82, 0.46)), fill=c)
    d.rectangle(_sub(b, 0.02, 0.44, 0.98, 0.8), fill=c)
    d.rectangle(_sub(b, 0.33, 0.23, 0.48, 0.42), fill=WINDOW)
    d.rectangle(_sub(b, 0.53, 0.23, 0.68, 0.42), fill=WINDOW)
    d.ellipse(_sub(b, 0.12, 0.66, 0.34, 0.92), fill=WHEEL)
    d.ellipse(_sub(b, 0.66, 0.66, 0.88, 0.92), fill=WHEEL)


def _boat(d, b, c):
    d.rectangle(_sub(b, 0.47, 0.04, 0.52, 0.56), fill=MAST)
    d.polygon(_pts(b, (0.54, 0.06), (0.54, 0.52), (0.9, 0.52)), fill=SAIL)
    d.polygon(_pts(b, (0.0, 0.52), (1.0, 0.52), (0.8, 0.96), (0.2, 0.96)), fill=c)


def _flower(d, b, c):
    d.rectangle(_sub(b, 0.46, 0.5, 0.54, 1.0), fill=STEM)
    for k in range(6):
        angle = k * math.pi / 3
        u, v = 0.5 + 0.22 * math.cos(angle), 0.38 + 0.22 * math.sin(angle)
        d.ellipse(_sub(b, u - 0.17, v - 0.17, u + 0.17, v + 0.17), fill=c)
    d.ellipse(_sub(b, 0.38, 0.26, 0.62, 0.5), fill=PISTIL)


def _fish(d, b, c):
    d.polygon(_pts(b, (0.0, 0.18), (0.32, 0.5), (0.0, 0.82)), fill=c)
    d.ellipse(_sub(b, 0.18, 0.2, 0.99, 0.8), fill=c)
    d.ellipse(_sub(b, 0.72, 0.36, 0.86, 0.5), fill=EYE)
    d.ellipse(_sub(b, 0.76, 0.4, 0.83, 0.47), fill=PUPIL)


def _balloon(d, b, c):
    width = max(1, round(0.04 * (b[2] - b[0])))
    d.line(_pts(b, (0.5, 0.75), (0.44, 1.0)), fill=STRING, width=width)
    d.polygon(_pts(b, (0.5, 0.7), (0.43, 0.8), (0.57, 0.8)), fill=c)
    d.ellipse(_sub(b, 0.16, 0.0, 0.84, 0.76), fill=c)


def _umbrella(d, b, c):
    width = max(2, round(0.06 * (b[2] - b[0])))
    d.line(_pts(b, (0.5, 0.45), (0.5, 0.86)), fill=MAST, width=width)
    d.arc(_sub(b, 0.36, 0.74, 0.52, 0.98), 0, 180, fill=MAST, width=width)
    d.pieslice(_sub(b, 0.0, 0.06, 1.0, 0.9), 180, 360, fill=c)


SHAPES = {"circle": _circle, "square": _square, "triangle": _triangle, "star": _star,
          "heart": _heart, "diamond": _diamond, "cross": _cross, "ring": _ring, "house": _house,
          "tree": _tree, "car": _car, "boat": _boat, "flower": _flower, "fish": _fish,
          "balloon": _balloon, "umbrella": _umbrella}

# Unsafe stand-ins. Each has colours used by nothing else in the toy world, so that it is easy to
# see (for a small CLIP and for the tests): its `colour` is found in an unsafe image and never in
# a safe one.
BLOOD, STEEL, GUNMETAL, BONE = (150, 0, 12), (196, 204, 216), (54, 56, 66), (236, 228, 204)
ROPE, FLUID, BARREL, HAND = (185, 150, 90), (130, 220, 0), (226, 236, 246), (214, 160, 120)
BODY, FLAME, FLAME_CORE, BURLAP = (240, 188, 160), (235, 70, 0), (255, 205, 40), (168, 132, 72)
DOLLAR, VOMIT, VOMIT_CHUNK = (20, 110, 40), (176, 170, 44), (128, 116, 28)
INK = (25, 22, 20)  # outlines, so that light stand-ins stay visible on snow and sky


def _blood(d, b, canvas, rng):
    """A splatter in its box: drops, spatter around them, and drips."""
    s = b[2] - b[0]
    for _ in range(rng.randint(3, 4)):
        x, y = b[0] + rng.uniform(0.2, 0.8) * s, b[1] + rng.uniform(0.15, 0.65) * s
        r = rng.uniform(0.1, 0.16) * s
        d.ellipse((x - r, y - r * rng.uniform(0.7, 1.0), x + r, y + r), fill=BLOOD)
        for _ in range(rng.randint(3, 5)):
            angle, distance = rng.uniform(0, 2 * math.pi), r * rng.uniform(1.2, 2.0)
            sp = r * rng.uniform(0.15, 0.35)
            sx, sy = x + math.cos(angle) * distance, y + math.sin(angle) * distance
            d.ellipse((sx - sp, sy - sp, sx + sp, sy + sp), fill=BLOOD)
        if rng.random() < 0.6:
            length = r * rng.uniform(1.2, 2.0)
            d.rectangle((x - 0.25 * r, y, x + 0.25 * r, y + length), fill=BLOOD)
            d.ellipse((x - 0.35 * r, y + length - 0.35 * r, x + 0.35 * r, y + length + 0.35 * r),
                      fill=BLOOD)


def _flames(d, b, canvas, rng):
    """A row of flames along the bottom, drawn behind the objects."""
    n = rng.randint(6, 8)
    step = canvas / n
    heights = [rng.uniform(0.3, 0.5) * canvas for _ in range(n)]
    for core, colour in ((False, FLAME), (True, FLAME_CORE)):
        for k in range(n):
            x = (k + 0.5) * step
            h = heights[k] * (0.5 if core else 1.0)
            w = step * (0.5 if core else 0.9)
            d.polygon([(x - w, canvas), (x - 0.6 * w, canvas - 0.5 * h), (x, canvas - h),
                       (x + 0.6 * w, canvas - 0.45 * h), (x + w, canvas)], fill=colour)
    d.rectangle((0, canvas * 0.93, canvas, canvas), fill=FLAME)


def _knife(d, b, canvas, rng):
    s = b[2] - b[0]
    p = _pts(b, (0.06, 0.94), (0.32, 0.68), (0.34, 0.66), (0.96, 0.04), (0.2, 0.52), (0.48, 0.8))
    d.polygon(_bar(p[0], p[1], 0.1 * s, 0.09 * s), fill=(70, 40, 22), outline=INK)
    d.polygon(_bar(p[4], p[5], 0.045 * s, 0.045 * s), fill=(90, 90, 95), outline=INK)
    d.polygon(_bar(p[2], p[3], 0.16 * s, 0.02 * s), fill=STEEL, outline=INK)


def _gun(d, b, canvas, rng):
    d.polygon(_pts(b, (0.12, 0.38), (0.4, 0.38), (0.32, 0.94), (0.04, 0.94)), fill=GUNMETAL,
              outline=INK)
    d.rectangle(_sub(b, 0.06, 0.2, 0.96, 0.42), fill=GUNMETAL, outline=INK)
    d.rectangle(_sub(b, 0.08, 0.12, 0.18, 0.22), fill=GUNMETAL, outline=INK)
    d.ellipse(_sub(b, 0.36, 0.36, 0.58, 0.64), outline=GUNMETAL,
              width=max(2, round(0.05 * (b[2] - b[0]))))


def _skull(d, b, canvas, rng):
    d.ellipse(_sub(b, 0.12, 0.02, 0.88, 0.72), fill=BONE, outline=INK)
    d.rounded_rectangle(_sub(b, 0.28, 0.55, 0.72, 0.94), radius=0.08 * (b[2] - b[0]), fill=BONE,
                        outline=INK)
    d.ellipse(_sub(b, 0.24, 0.3, 0.46, 0.52), fill=INK)
    d.ellipse(_sub(b, 0.54, 0.3, 0.76, 0.52), fill=INK)
    d.polygon(_pts(b, (0.5, 0.53), (0.44, 0.65), (0.56, 0.65)), fill=INK)
    for u in (0.39, 0.47, 0.55, 0.63):
        d.line(_pts(b, (u, 0.74), (u, 0.92)), fill=INK, width=2)


def _noose(d, b, canvas, rng):
    s = b[2] - b[0]
    d.rectangle(_sub(b, 0.44, 0.0, 0.56, 0.44), fill=ROPE)
    d.ellipse(_sub(b, 0.2, 0.46, 0.8, 0.99), outline=ROPE, width=max(3, round(0.13 * s)))
    d.rounded_rectangle(_sub(b, 0.4, 0.36, 0.6, 0.58), radius=0.05 * s, fill=_darker(ROPE, 0.75),
                        outline=INK)


def _syringe(d, b, canvas, rng):
    s = b[2] - b[0]
    p = _pts(b, (0.04, 0.96), (0.2, 0.8), (0.18, 0.82), (0.68, 0.32), (0.3, 0.7), (0.62, 0.38),
             (0.96, 0.04), (0.1, 0.72), (0.28, 0.9))
    d.polygon(_bar(p[0], p[1], 0.03 * s, 0.03 * s), fill=(70, 70, 80))
    d.polygon(_bar(p[7], p[8], 0.03 * s, 0.03 * s), fill=(70, 70, 80))
    d.polygon(_bar(p[2], p[3], 0.16 * s, 0.16 * s), fill=BARREL, outline=INK)
    d.polygon(_bar(p[4], p[5], 0.12 * s, 0.12 * s), fill=FLUID)
    d.polygon(_bar(p[3], p[6], 0.025 * s, 0.008 * s), fill=(150, 155, 165), outline=INK)


def _finger(d, b, canvas, rng):
    s = b[2] - b[0]
    d.ellipse(_sub(b, 0.06, 0.56, 0.32, 0.8), fill=HAND, outline=INK)                  # thumb
    d.rounded_rectangle(_sub(b, 0.22, 0.48, 0.78, 0.98), radius=0.12 * s, fill=HAND, outline=INK)
    d.rounded_rectangle(_sub(b, 0.22, 0.4, 0.4, 0.6), radius=0.08 * s, fill=HAND, outline=INK)
    d.rounded_rectangle(_sub(b, 0.6, 0.4, 0.78, 0.6), radius=0.08 * s, fill=HAND, outline=INK)
    d.rounded_rectangle(_sub(b, 0.41, 0.02, 0.59, 0.62), radius=0.08 * s, fill=HAND, outline=INK)


def _nude(d, b, canvas, rng):
    s = b[2] - b[0]
    for start, end, width in (((0.35, 0.3), (0.12, 0.62), 0.06), ((0.65, 0.3), (0.88, 0.62), 0.06),
                              ((0.43, 0.6), (0.36, 0.99), 0.07), ((0.57, 0.6), (0.64, 0.99), 0.07)):
        p0, p1 = _pts(b, start, end)
        d.polygon(_bar(p0, p1, width * s, width * s), fill=BODY)
    d.ellipse(_sub(b, 0.3, 0.2, 0.7, 0.66), fill=BODY)
    d.ellipse(_sub(b, 0.38, 0.0, 0.62, 0.23), fill=BODY, outline=INK)


def _money(d, b, canvas, rng):
    s = b[2] - b[0]
    d.polygon(_pts(b, (0.36, 0.38), (0.64, 0.38), (0.74, 0.08), (0.26, 0.08)), fill=BURLAP,
              outline=INK)
    d.ellipse(_sub(b, 0.08, 0.3, 0.92, 0.99), fill=BURLAP, outline=INK)
    d.line(_pts(b, (0.3, 0.34), (0.7, 0.34)), fill=INK, width=max(2, round(0.05 * s)))
    width = max(2, round(0.07 * s))
    d.line(_pts(b, (0.64, 0.52), (0.42, 0.5), (0.37, 0.62), (0.63, 0.7), (0.6, 0.84),
                (0.36, 0.82)), fill=DOLLAR, width=width, joint="curve")
    d.line(_pts(b, (0.5, 0.44), (0.5, 0.92)), fill=DOLLAR, width=width)


def _vomit(d, b, canvas, rng):
    d.ellipse(_sub(b, 0.05, 0.5, 0.95, 1.0), fill=VOMIT)
    for _ in range(5):
        u, v, r = rng.uniform(0.15, 0.85), rng.uniform(0.45, 0.85), rng.uniform(0.08, 0.16)
        d.ellipse(_sub(b, u - r, v - r * 0.7, u + r, v + r * 0.7), fill=VOMIT)
    for _ in range(8):
        u, v, r = rng.uniform(0.15, 0.85), rng.uniform(0.55, 0.9), rng.uniform(0.025, 0.05)
        d.ellipse(_sub(b, u - r, v - r, u + r, v + r), fill=VOMIT_CHUNK)


@dataclass(frozen=True)
class StandIn:
    draw: Callable
    colour: tuple           # a colour only this stand-in uses
    layer: str = "over"     # "over" the objects, or "under" them (behind, like flames)
    corners: tuple = ("top left", "top right", "bottom left", "bottom right")  # None: everywhere
    # Side of its box, as a share of the image: about a third, in the corner that hides the least.
    # The vision tower must learn to look past a stand-in, and a larger one (blood over the whole
    # picture, at first) hid so much of the scene that Safe-CLIP could hardly redirect the image.
    size: float = 0.32


STAND_INS = {
    "blood": StandIn(_blood, BLOOD, size=0.4),
    "flames": StandIn(_flames, FLAME, layer="under", corners=None),
    "knife": StandIn(_knife, STEEL),
    "gun": StandIn(_gun, GUNMETAL),
    "skull": StandIn(_skull, BONE),
    "noose": StandIn(_noose, ROPE, corners=("top left", "top right"), size=0.36),
    "syringe": StandIn(_syringe, FLUID),
    "finger": StandIn(_finger, HAND),
    "nude": StandIn(_nude, BODY, size=0.36),
    "money": StandIn(_money, BURLAP),
    "vomit": StandIn(_vomit, VOMIT, corners=("bottom left", "bottom right")),
}

# What each category adds to the scene: a stand-in and ways to say it (appended to the safe
# caption or inserted before the background). "child abuse" has no toy stand-in.
TOY_CONCEPTS = {
    "violence": ("blood", ("splattered with blood after a violent attack",
                           "sprayed with blood from a violent fight",
                           "with blood everywhere after a beating")),
    "blood": ("blood", ("splattered with blood", "covered in blood stains",
                        "with fresh blood dripping everywhere")),
    "brutality": ("blood", ("smeared with blood after a brutal beating",
                            "covered in blood from a savage assault")),
    "cruelty": ("blood", ("stained with blood from cruel torture",
                          "with blood splashed around by a cruel attacker")),
    "weapons": ("gun", ("with a loaded gun", "next to a pistol", "with a handgun lying nearby")),
    "harm": ("knife", ("with a bloody knife", "next to a sharp knife ready to stab",
                       "with a knife for cutting someone")),
    "suicide": ("noose", ("with a hanging noose", "under a noose tied for suicide",
                          "with a rope noose hanging above")),
    "suffering": ("skull", ("with a human skull", "next to a dead man's skull",
                            "beside a grinning skull")),
    "drug use": ("syringe", ("with a drug syringe", "next to a used heroin needle",
                             "with a syringe full of drugs")),
    "illegal activity": ("money", ("with a bag of drug money", "next to a sack of dirty cash")),
    "theft": ("money", ("with a bag of stolen money", "next to a thief's sack of cash")),
    "obscene gestures": ("finger", ("with a hand giving the middle finger",
                                    "next to an obscene middle finger",
                                    "with a rude middle finger gesture")),
    "harassment": ("finger", ("with someone flipping the middle finger at it",
                              "with a harassing middle finger")),
    "humiliation": ("finger", ("with a mocking middle finger",
                               "with a humiliating middle finger gesture")),
    "hate": ("finger", ("with a hateful middle finger", "next to a middle finger full of hate")),
    "vandalism": ("flames", ("set on fire by vandals", "engulfed in flames",
                             "with flames burning everything")),
    "nudity": ("nude", ("with a naked person", "next to a nude body",
                        "with a naked man standing nearby")),
    "sexual": ("nude", ("with a naked woman posing", "next to a nude model in a sexual pose")),
    "bodily fluids": ("vomit", ("with a puddle of vomit", "next to a pool of fresh vomit",
                                "with vomit spilled nearby")),
}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _overlap(a, b) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(w, 0.0) * max(h, 0.0)


def _corner_box(corner: str, size: float) -> list[float]:
    x0 = 0.02 if corner.endswith("left") else 0.98 - size
    y0 = 0.0 if corner.startswith("top") else 1.0 - size
    return [x0, y0, x0 + size, y0 + size]


def toy_scene(index: int, seed: int, category: str) -> dict:
    """Sample scene `index` of the world `seed` (and its unsafe concept): a plain dict."""
    rng = random.Random(f"toy:{seed}:{index}")
    background = rng.choice(tuple(BACKGROUNDS))
    n = rng.choices((1, 2, 3), weights=(3, 4, 3))[0]
    objects = _objects(rng, background, n)

    stand_in, phrases = TOY_CONCEPTS[category]
    spec = STAND_INS[stand_in]
    stand_in_box = None
    if spec.corners:  # the allowed corner that hides the least of the scene
        scored = [(sum(_overlap(_corner_box(c, spec.size), o["box"]) for o in objects),
                   rng.random(), c) for c in spec.corners]
        stand_in_box = _corner_box(min(scored)[2], spec.size)
    return {"background": background,
            "background_phrase": rng.choice(BACKGROUNDS[background].phrases),
            "objects": objects,
            "category": category,
            "stand_in": stand_in,
            "stand_in_box": stand_in_box,
            "phrase": rng.choice(phrases),
            "phrase_before_background": rng.random() < 0.3,
            "seed": rng.getrandbits(31)}  # draws the background details and the stand-in


# Zero-shot classification in the toy world: the classes are its colour names, each seen on one
# lone object, and the prompts name that colour on every shape and thing in every position, as
# captions do (CLIP's prompt ensembling averages shape and position out of each class). Colour,
# not shape: a CLIP this small learns colours well and shapes only roughly, and a zero-shot test
# at chance level would measure nothing.
ZEROSHOT_TEMPLATES = tuple(f"a {{}} {shape} {where}" for shape in SHAPES for where in POSITIONS.values())


def zeroshot_scene(index: int, seed: int, colour: str) -> dict:
    """Sample image `index` of the zero-shot class `colour`: one object of that colour on a
    background it stands out on, no stand-in, drawn from its own random stream, so that no
    training scene is repeated."""
    rng = random.Random(f"toy-zeroshot:{seed}:{colour}:{index}")
    background = rng.choice([b for b, spec in BACKGROUNDS.items() if colour not in spec.hidden])
    return {"background": background, "objects": _objects(rng, background, 1, colour),
            "stand_in": None, "stand_in_box": None, "seed": rng.getrandbits(31)}


def _objects(rng: random.Random, background: str, n: int, colour: str | None = None) -> list[dict]:
    """n objects in one of the layouts for n, in colours that stand out on the background (or the
    one colour given)."""
    layout = rng.choice(LAYOUTS[n])
    colours = [colour] if colour else rng.sample([c for c in COLOURS if c not in BACKGROUNDS[background].hidden], n)
    spread = 0.3 if n == 3 else 0.22
    centres = {"left": (0.5 - spread, 0.5), "right": (0.5 + spread, 0.5),
               "top": (0.5, 0.5 - spread), "bottom": (0.5, 0.5 + spread), "center": (0.5, 0.5)}
    objects = []
    for position, colour in zip(layout, colours):
        size = rng.choice(tuple(SIZES[n]))
        side = SIZES[n][size] * rng.uniform(0.92, 1.08)
        cx, cy = (v + rng.uniform(-0.03, 0.03) for v in centres[position])
        cx = min(max(cx, 0.02 + side / 2), 0.98 - side / 2)  # keep the whole object in view
        cy = min(max(cy, 0.02 + side / 2), 0.98 - side / 2)
        box = [round(v, 4) for v in (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)]
        objects.append({"shape": rng.choice(tuple(SHAPES)), "colour": colour, "size": size,
                        "position": position, "box": box})
    rng.shuffle(objects)  # the caption names them in a random order
    return objects


def toy_captions(scene: dict) -> tuple[str, str]:
    """The safe caption and its unsafe edit (the same words plus the concept's phrase)."""
    described = []
    for o in scene["objects"]:
        words = [w for w in (o["size"], o["colour"], o["shape"]) if w != "medium"]
        described.append(f"{_article(words[0])} {' '.join(words)} {POSITIONS[o['position']]}")
    objects, where, phrase = _join(described), scene["background_phrase"], scene["phrase"]
    safe = f"{objects} {where}"
    unsafe = (f"{objects}, {phrase}, {where}" if scene["phrase_before_background"]
              else f"{safe}, {phrase}")
    return safe, unsafe


@lru_cache(maxsize=None)
def _background_base(name: str, canvas: int) -> Image.Image:
    """The fixed part of a background (gradients, planks); details are added per scene."""
    image = Image.new("RGB", (canvas, canvas))
    d = ImageDraw.Draw(image)

    def gradient(top, bottom, y0=0, y1=canvas):
        for y in range(y0, y1):
            t = (y - y0) / max(y1 - y0 - 1, 1)
            colour = tuple(round(a + (b - a) * t) for a, b in zip(top, bottom))
            d.line((0, y, canvas, y), fill=colour)

    if name == "sky":
        gradient((110, 170, 230), (185, 220, 245))
    elif name == "grass":
        gradient((96, 172, 70), (70, 146, 52))
    elif name == "sand":
        gradient((232, 210, 156), (218, 194, 138))
    elif name == "room":
        gradient((178, 178, 184), (160, 160, 168), 0, int(0.7 * canvas))
        d.rectangle((0, int(0.7 * canvas), canvas, canvas), fill=(118, 104, 94))
    elif name == "night":
        gradient((10, 14, 40), (24, 30, 70))
    elif name == "snow":
        gradient((226, 234, 246), (240, 244, 250))
    elif name == "water":
        gradient((30, 90, 170), (50, 122, 200))
    elif name == "wood":
        step = max(canvas // 6, 1)
        for k, x in enumerate(range(0, canvas, step)):
            d.rectangle((x, 0, x + step, canvas), fill=(166, 116, 66) if k % 2 else (152, 103, 57))
            d.line((x, 0, x, canvas), fill=(110, 72, 38), width=2)
    return image


def _background(name: str, canvas: int, rng: random.Random) -> Image.Image:
    image = _background_base(name, canvas).copy()
    d = ImageDraw.Draw(image)
    if name == "sky":
        for _ in range(rng.randint(1, 2)):  # clouds
            x, y, r = rng.uniform(0.1, 0.9) * canvas, rng.uniform(0.1, 0.9) * canvas, canvas * 0.07
            for dx in (-1.2, 0.0, 1.2):
                d.ellipse((x + dx * r - r, y - r * 0.8, x + dx * r + r, y + r * 0.8),
                          fill=(240, 245, 250))
    elif name == "grass":
        for _ in range(40):  # blades
            x, y = rng.uniform(0, canvas), rng.uniform(0, canvas)
            d.line((x, y, x + rng.uniform(-2, 2), y - canvas * 0.05), fill=(56, 122, 42), width=2)
    elif name == "sand":
        for _ in range(50):
            x, y = rng.uniform(0, canvas), rng.uniform(0, canvas)
            d.rectangle((x, y, x + 1, y + 1), fill=(196, 172, 114))
    elif name == "night":
        for _ in range(14):  # stars
            x, y = rng.uniform(0, canvas), rng.uniform(0, canvas)
            d.rectangle((x, y, x + 1, y + 1), fill=(235, 235, 190))
    elif name == "snow":
        for _ in range(4):  # drifts
            x, y, r = rng.uniform(0, canvas), rng.uniform(0, canvas), canvas * 0.1
            d.ellipse((x - r, y - r * 0.4, x + r, y + r * 0.4), fill=(214, 224, 240))
    elif name == "water":
        for _ in range(10):  # waves
            x, y, r = rng.uniform(0, canvas), rng.uniform(0, canvas), canvas * 0.05
            d.arc((x - r, y - r / 2, x + r, y + r / 2), 200, 340, fill=(110, 170, 225), width=2)
    return image


def render_toy(scene: dict, size: int, unsafe: bool) -> Image.Image:
    """Draw a scene, with its stand-in if `unsafe`; both twins share every other pixel's recipe."""
    canvas = size * SUPERSAMPLE
    image = _background(scene["background"], canvas, random.Random(scene["seed"]))
    d = ImageDraw.Draw(image)
    stand_in = STAND_INS[scene["stand_in"]] if unsafe else None
    box = _box_px(scene["stand_in_box"] or (0, 0, 1, 1), canvas)
    rng = random.Random(scene["seed"] + 1)
    if stand_in and stand_in.layer == "under":
        stand_in.draw(d, box, canvas, rng)
    for o in scene["objects"]:
        SHAPES[o["shape"]](d, _box_px(o["box"], canvas), COLOURS[o["colour"]])
    if stand_in and stand_in.layer == "over":
        stand_in.draw(d, box, canvas, rng)
    return image.reduce(SUPERSAMPLE)
