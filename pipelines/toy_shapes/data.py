"""Procedural captioned clips of coloured shapes, sampled and rendered in batches with torch.

A clip holds one to three objects of distinct colours on a grey-level background (plain or a
simple texture). Each object is a circle, square or triangle that moves left/right/up/down,
bounces, rotates, grows or shrinks. Random choices come from a CPU ``torch.Generator`` so a
seed gives the same clips on any device; rendering (anti-aliased signed distances, composited
back to front) runs on whatever device is asked for, so training renders its data on the GPU.

Held-out split: ``HELD_OUT_TRIPLES`` lists (colour, shape, motion) combinations that training
never shows, on any object; evaluation renders captions built from exactly these.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from .config import MIN_SIZE

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "orange": (1.00, 0.55, 0.00),
    "yellow": (0.95, 0.90, 0.10),
    "green": (0.10, 0.75, 0.20),
    "cyan": (0.10, 0.85, 0.90),
    "blue": (0.15, 0.30, 0.95),
    "purple": (0.60, 0.20, 0.85),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
MOTIONS: tuple[str, ...] = (
    "moves left", "moves right", "moves up", "moves down", "bounces", "rotates", "grows", "shrinks",
)
BACKGROUNDS: tuple[str, ...] = ("black", "gray", "white", "checkered", "striped")
# Unit direction (dx, dy) in image coordinates (y points down) of the four translations.
DIRECTIONS: dict[str, tuple[int, int]] = {
    "moves left": (-1, 0), "moves right": (1, 0), "moves up": (0, -1), "moves down": (0, 1),
}
MAX_OBJECTS = 3

_COLOUR_NAMES = tuple(COLOURS)
_PALETTE = torch.tensor(list(COLOURS.values()))
_M = {name: i for i, name in enumerate(MOTIONS)}
_CIRCLE, _SQUARE, _TRIANGLE = 0, 1, 2
# Triangle circumradius and the largest half-extent of any shape, in units of `size`, so that
# the three shapes cover similar areas and every position bound keeps the whole shape in frame.
_TRI_R = 1.4
_EXTENT = 1.45


def _valid(shape: int, motion: int) -> bool:
    # A rotating circle looks static, so that caption would be a lie.
    return not (shape == _CIRCLE and motion == _M["rotates"])


def _held_out() -> tuple[tuple[str, str, str], ...]:
    # 20 triples: three per translation, two per other motion; colours and shapes cycle so every
    # colour, shape and motion stays in training through its other combinations.
    quota = {m: (3 if m in DIRECTIONS else 2) for m in MOTIONS}
    out, k = [], 0
    for motion in MOTIONS:
        for _ in range(quota[motion]):
            shape = k % 3 if _valid(k % 3, _M[motion]) else 1 + k % 2
            out.append((_COLOUR_NAMES[k % len(COLOURS)], SHAPES[shape], motion))
            k += 1
    return tuple(out)


HELD_OUT_TRIPLES: tuple[tuple[str, str, str], ...] = _held_out()


def caption_words() -> list[str]:
    """Every word (and the comma) a caption can contain, in a fixed order."""
    words = ["a", ",", "on", "background"] + list(COLOURS) + list(SHAPES) + list(BACKGROUNDS)
    for m in MOTIONS:
        words += [w for w in m.split() if w not in words]
    return words


def caption_for(objects: list[tuple[str, str, str]], background: str) -> str:
    """``[("red", "circle", "moves left"), ...], "black"`` -> "a red circle moves left on a black background"."""
    if not objects:
        raise ValueError("objects must name at least one (colour, shape, motion)")
    for colour, shape, motion in objects:
        if colour not in COLOURS or shape not in SHAPES or motion not in MOTIONS:
            raise ValueError(f"objects: unknown (colour, shape, motion) {(colour, shape, motion)}")
    if background not in BACKGROUNDS:
        raise ValueError(f"background must be one of {BACKGROUNDS}, got {background!r}")
    phrases = ", ".join(f"a {c} {s} {m}" for c, s, m in objects)
    return f"{phrases} on a {background} background"


@dataclass
class ClipBatch:
    """Everything needed to render and describe a batch of B clips with up to K objects.

    Index tensors are (B, K) with -1 where ``active`` is False; trajectories are (B, K, F) in
    pixels (centre x, centre y, size) and radians (angle). All tensors live on the CPU.
    """

    colour: torch.Tensor
    shape: torch.Tensor
    motion: torch.Tensor
    active: torch.Tensor
    background: torch.Tensor
    rgb: torch.Tensor
    bg_level: torch.Tensor
    cx: torch.Tensor
    cy: torch.Tensor
    size: torch.Tensor
    angle: torch.Tensor
    height: int
    width: int

    def window(self, start: int, length: int) -> "ClipBatch":
        """The same clips cut to frames [start, start + length)."""
        if not (0 <= start and length >= 1 and start + length <= self.num_frames):
            raise ValueError(f"window [{start}, {start + length}) is outside the clip's {self.num_frames} frames")
        cut = {k: getattr(self, k)[..., start:start + length] for k in ("cx", "cy", "size", "angle")}
        return replace(self, **cut)

    @property
    def num_frames(self) -> int:
        return self.cx.shape[-1]

    def objects(self, b: int) -> list[tuple[str, str, str]]:
        """The (colour, shape, motion) names of clip ``b``'s objects, back to front."""
        return [
            (_COLOUR_NAMES[int(self.colour[b, k])], SHAPES[int(self.shape[b, k])], MOTIONS[int(self.motion[b, k])])
            for k in range(self.colour.shape[1]) if self.active[b, k]
        ]

    @property
    def captions(self) -> list[str]:
        return [caption_for(self.objects(b), BACKGROUNDS[int(self.background[b])]) for b in range(len(self.background))]


def _check_geometry(num_frames: int, height: int, width: int) -> None:
    if num_frames < 2:
        raise ValueError(f"num_frames must be >= 2, got {num_frames}")
    if height < MIN_SIZE or width < MIN_SIZE:
        raise ValueError(f"height and width must be >= {MIN_SIZE} px, got {height}x{width}")


def _uniform(g: torch.Generator, shape: tuple[int, ...], lo, hi) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(shape, generator=g)


def _trajectories(colour, shape, motion, active, background, g, num_frames, height, width) -> ClipBatch:
    """Draw the continuous parameters of every object and turn them into per-frame tracks."""
    B, K = colour.shape
    F = num_frames
    tau = torch.linspace(0.0, 1.0, F)  # clip time in [0, 1]
    u = lambda lo, hi: _uniform(g, (B, K), lo, hi)  # noqa: E731
    is_m = lambda name: (motion == _M[name])  # noqa: E731

    grows, shrinks = is_m("grows"), is_m("shrinks")
    s_small = u(3.5, 4.5)
    s_big = s_small * u(1.6, 1.9)
    size_static = torch.where(is_m("rotates"), u(5.0, 7.5), u(4.5, 7.0))
    s0 = torch.where(grows, s_small, torch.where(shrinks, s_big, size_static))
    s1 = torch.where(grows, s_big, torch.where(shrinks, s_small, size_static))
    size = s0[..., None] + (s1 - s0)[..., None] * tau

    margin = _EXTENT * torch.maximum(s0, s1) + 1.0  # keeps the whole shape inside the frame
    lo_x, hi_x = margin, width - margin
    lo_y, hi_y = margin, height - margin
    x_static, y_static = lo_x + (hi_x - lo_x) * u(0, 1), lo_y + (hi_y - lo_y) * u(0, 1)

    # Translations: a straight path of 14-22 px (shortened if the frame is too small).
    dx = torch.zeros(B, K)
    dy = torch.zeros(B, K)
    for name, (ex, ey) in DIRECTIONS.items():
        dx = torch.where(is_m(name), float(ex), dx)
        dy = torch.where(is_m(name), float(ey), dy)
    span = torch.where(dx != 0, hi_x - lo_x, hi_y - lo_y)
    dist = torch.minimum(u(14.0, 22.0), span)
    # Start so that start + dir * dist stays inside [lo, hi].
    free = u(0, 1) * (span - dist)
    x0 = torch.where(dx > 0, lo_x + free, torch.where(dx < 0, hi_x - free, x_static))
    y0 = torch.where(dy > 0, lo_y + free, torch.where(dy < 0, hi_y - free, y_static))
    cx = x0[..., None] + (dx * dist)[..., None] * tau
    cy = y0[..., None] + (dy * dist)[..., None] * tau

    # Bounce: hops on a floor, y = floor - A |sin(pi n tau + phi)|, with n >= 1.3 half-periods so
    # every clip shows both a rise and a fall.
    amp = torch.minimum(u(10.0, 18.0), hi_y - lo_y)
    hops = u(1.3, 2.0)
    phase = u(0.0, math.pi)
    y_bounce = hi_y[..., None] - amp[..., None] * torch.sin(math.pi * hops[..., None] * tau + phase[..., None]).abs()
    cy = torch.where(is_m("bounces")[..., None], y_bounce, cy)

    # Rotation: 0.6-1.2 pi over the clip, either sense; every other object keeps angle 0
    # (squares axis-aligned, triangles apex up) so rotation is what the caption says.
    turn = u(0.6 * math.pi, 1.2 * math.pi) * torch.where(u(0, 1) < 0.5, -1.0, 1.0)
    angle = torch.where(is_m("rotates")[..., None], turn[..., None] * tau, torch.zeros(B, K, F))

    jitter = _uniform(g, (B, K, 3), -0.04, 0.04)
    rgb = (_PALETTE[colour.clamp(min=0)] + jitter).clamp(0.0, 1.0)
    bg_level = _uniform(g, (B,), -0.04, 0.04)
    return ClipBatch(colour, shape, motion, active, background, rgb, bg_level, cx, cy, size, angle, height, width)


def _allowed_table(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per colour, the (shape, motion) pairs a split may draw: (C, P, 2) padded and (C,) counts."""
    held = {(c, s, m) for c, s, m in HELD_OUT_TRIPLES}
    rows = []
    for c in COLOURS:
        pairs = [
            (si, mi) for si, s in enumerate(SHAPES) for mi, m in enumerate(MOTIONS)
            if _valid(si, mi) and (split == "all" or (c, s, m) not in held)
        ]
        rows.append(pairs)
    width = max(len(r) for r in rows)
    table = torch.tensor([r + [r[0]] * (width - len(r)) for r in rows])
    return table, torch.tensor([len(r) for r in rows])


def sample_batch(
    batch_size: int,
    generator: torch.Generator,
    *,
    num_frames: int = 17,
    height: int = 48,
    width: int = 48,
    split: str = "train",
    max_objects: int = MAX_OBJECTS,
) -> ClipBatch:
    """Draw ``batch_size`` random clips. ``split="train"`` never uses a held-out triple; "all" may."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if split not in ("train", "all"):
        raise ValueError(f"split must be 'train' or 'all', got {split!r}")
    if not 1 <= max_objects <= len(COLOURS):
        raise ValueError(f"max_objects must be in [1, {len(COLOURS)}], got {max_objects}")
    _check_geometry(num_frames, height, width)
    g = generator
    B, K = batch_size, max_objects
    n_obj = torch.randint(1, K + 1, (B,), generator=g)
    active = torch.arange(K)[None, :] < n_obj[:, None]
    colour = torch.rand(B, len(COLOURS), generator=g).argsort(dim=1)[:, :K]  # distinct colours
    table, counts = _allowed_table(split)
    pick = (torch.rand(B, K, generator=g) * counts[colour]).long()
    pair = table[colour, pick]
    shape, motion = pair[..., 0], pair[..., 1]
    background = torch.randint(0, len(BACKGROUNDS), (B,), generator=g)
    colour, shape, motion = (torch.where(active, t, -1) for t in (colour, shape, motion))
    return _trajectories(colour, shape, motion, active, background, g, num_frames, height, width)


def batch_from_objects(
    clips: list[tuple[list[tuple[str, str, str]], str]],
    generator: torch.Generator,
    *,
    num_frames: int = 17,
    height: int = 48,
    width: int = 48,
) -> ClipBatch:
    """Clips with chosen objects and backgrounds (positions, speeds, sizes still drawn at random)."""
    if not clips:
        raise ValueError("clips must not be empty")
    _check_geometry(num_frames, height, width)
    K = max(len(objs) for objs, _ in clips)
    B = len(clips)
    colour = torch.full((B, K), -1)
    shape = torch.full((B, K), -1)
    motion = torch.full((B, K), -1)
    background = torch.zeros(B, dtype=torch.long)
    for b, (objs, bg) in enumerate(clips):
        caption_for(objs, bg)  # validates names
        if len({c for c, _, _ in objs}) != len(objs):
            raise ValueError(f"clips[{b}]: object colours must be distinct")
        if any(not _valid(SHAPES.index(s), MOTIONS.index(m)) for _, s, m in objs):
            raise ValueError(f"clips[{b}]: a circle cannot be captioned as rotating")
        background[b] = BACKGROUNDS.index(bg)
        for k, (c, s, m) in enumerate(objs):
            colour[b, k], shape[b, k], motion[b, k] = _COLOUR_NAMES.index(c), SHAPES.index(s), MOTIONS.index(m)
    return _trajectories(colour, shape, motion, colour >= 0, background, generator, num_frames, height, width)


def _seen_twin(triple: tuple[str, str, str]) -> tuple[str, str, str]:
    """A training triple with the held-out triple's shape and motion: the next colour that has it."""
    colour, shape, motion = triple
    start = _COLOUR_NAMES.index(colour)
    for step in range(3, 3 + len(_COLOUR_NAMES)):
        twin = (_COLOUR_NAMES[(start + step) % len(_COLOUR_NAMES)], shape, motion)
        if twin not in HELD_OUT_TRIPLES:
            return twin
    raise AssertionError(f"every colour of {shape} {motion} is held out")


def eval_clips(split: str = "held-out") -> list[tuple[list[tuple[str, str, str]], str]]:
    """The 20 evaluation clips, one object each, backgrounds in turn.

    ``"held-out"``: the held-out triples, never trained on. ``"seen"``: for each, a triple training
    does show with the same shape, motion and background, so that the two reports together tell
    what was not learned from what does not generalise.
    """
    if split not in ("held-out", "seen"):
        raise ValueError(f"split must be 'held-out' or 'seen', got {split!r}")
    triples = HELD_OUT_TRIPLES if split == "held-out" else tuple(_seen_twin(t) for t in HELD_OUT_TRIPLES)
    return [([triple], BACKGROUNDS[i % len(BACKGROUNDS)]) for i, triple in enumerate(triples)]


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``. A CPU tensor bound for a GPU is copied from pinned memory without blocking:
    a copy from pageable memory waits for all queued GPU work, and in training that left the GPU idle at
    every step while the host prepared the next one."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _backgrounds(batch: ClipBatch, device: torch.device) -> torch.Tensor:
    H, W = batch.height, batch.width
    y = torch.arange(H, device=device)[:, None]
    x = torch.arange(W, device=device)[None, :]
    checker = torch.where(((x // 8 + y // 8) % 2) == 0, 0.30, 0.45)
    stripes = torch.where((((x + y) // 6) % 2) == 0, 0.25, 0.40)
    plain = [torch.full((H, W), v, device=device) for v in (0.06, 0.50, 0.94)]
    bank = torch.stack(plain + [checker, stripes])  # order of BACKGROUNDS
    bg = bank[to_device(batch.background, device)] + to_device(batch.bg_level, device)[:, None, None]
    return bg.clamp(0.0, 1.0)


def _alphas(batch: ClipBatch, device: torch.device) -> torch.Tensor:
    """Each object's coverage of each pixel, (B, K, F, H, W) in [0, 1] (0 for inactive objects)."""
    H, W = batch.height, batch.width
    cx, cy, size, angle = (to_device(t, device)[..., None, None] for t in (batch.cx, batch.cy, batch.size, batch.angle))
    px = torch.arange(W, device=device, dtype=torch.float32) + 0.5 - cx  # (B, K, F, 1, W)
    py = torch.arange(H, device=device, dtype=torch.float32)[:, None] + 0.5 - cy  # (B, K, F, H, 1)
    cos, sin = torch.cos(angle), torch.sin(angle)
    u = cos * px + sin * py  # coordinates in the object's own (unrotated) frame
    v = -sin * px + cos * py
    d_circle = torch.sqrt(px * px + py * py) - size
    d_square = torch.maximum(u.abs(), v.abs()) - size
    # Equilateral triangle, apex up: the farthest of its three edge half-planes.
    h = 0.5 * math.sqrt(3.0)
    d_tri = torch.maximum(torch.maximum(v, -h * u - 0.5 * v), h * u - 0.5 * v) - 0.5 * _TRI_R * size
    shape = to_device(batch.shape, device)[..., None, None, None]
    dist = torch.where(shape == _CIRCLE, d_circle, torch.where(shape == _SQUARE, d_square, d_tri))
    return (0.5 - dist).clamp(0.0, 1.0) * to_device(batch.active, device)[..., None, None, None]  # 1-px anti-aliasing


def render(batch: ClipBatch, device: torch.device | str = "cpu") -> torch.Tensor:
    """Render a batch to float frames (B, F, 3, H, W) in [0, 1] on ``device``."""
    return render_with_coverage(batch, device)[0]


def render_with_coverage(batch: ClipBatch, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``render``'s frames, and the pixels any object covers, (B, F, H, W) in [0, 1]: where the
    captions' content is (training's foreground weights), from the same object alphas."""
    dev = torch.device(device)
    alpha = _alphas(batch, dev)
    img = _backgrounds(batch, dev)[:, None, None].expand(-1, batch.num_frames, 3, -1, -1)  # (B, F, 3, H, W)
    rgb = to_device(batch.rgb, dev)
    for k in range(alpha.shape[1]):
        a = alpha[:, k, :, None]  # (B, F, 1, H, W)
        img = img * (1.0 - a) + a * rgb[:, k, None, :, None, None]
    return img.contiguous(), alpha.amax(dim=1)
