"""Loss curves as PNG files with no plotting library (gr runs on torch, numpy and the standard library).

A small raster: axes, tick labels in a 3x5 pixel font, one colored line per series, and a legend.
"""

import struct
import zlib

import numpy as np

# 3x5 glyphs, one string of 15 bits per character, rows top to bottom.
FONT = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001010010010",
    "8": "111101111101111", "9": "111101111001111", ".": "000000000000010", "-": "000000111000000",
    "e": "000111111100111", "a": "000011101101011", "c": "000111100100111", "d": "001001111101111",
    "i": "010000010010010", "l": "110010010010111", "n": "000110101101101", "o": "000111101101111",
    "p": "000111101111100", "r": "000111100100100", "s": "000111110011111", "t": "010111010010011",
    "u": "000101101101111", "v": "000101101101010", "/": "001001010100100", " ": "000000000000000",
    "_": "000000000000111", "k": "100101110101101", "m": "000111111101101", "g": "011101011001110",
    "h": "100100111101101", "f": "011010111010010", "w": "000101101111111", "y": "000101111001111",
    "b": "100100111101111", "x": "000101010101101",
}
COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]


def _text(img, x, y, text, color=(0, 0, 0), scale=2):
    for ch in text.lower():
        bits = FONT.get(ch, FONT[" "])
        for r in range(5):
            for c in range(3):
                if bits[r * 3 + c] == "1":
                    img[y + r * scale:y + (r + 1) * scale, x + c * scale:x + (c + 1) * scale] = color
        x += 4 * scale


def _line(img, x0, y0, x1, y1, color):
    n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
    xs = np.linspace(x0, x1, n).round().astype(int)
    ys = np.linspace(y0, y1, n).round().astype(int)
    for dy in (0, 1):
        img[np.clip(ys + dy, 0, img.shape[0] - 1), xs] = color


def write_png(path, img: np.ndarray) -> None:
    """An RGB uint8 array (H, W, 3) as a PNG file."""
    h, w, _ = img.shape
    raw = b"".join(b"\x00" + img[y].tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def plot_curves(path, series: dict, width: int = 720, height: int = 420, xlabel: str = "step") -> None:
    """Plot {name: (xs, ys)} as lines on shared axes and save a PNG."""
    series = {k: (list(xs), list(ys)) for k, (xs, ys) in series.items() if len(xs)}
    img = np.full((height, width, 3), 255, dtype=np.uint8)
    left, right, top, bottom = 70, width - 20, 20, height - 40
    img[top:bottom + 1, left] = img[bottom, left:right + 1] = (0, 0, 0)
    if series:
        xs_all = [x for xs, _ in series.values() for x in xs]
        ys_all = [y for _, ys in series.values() for y in ys]
        x0, x1 = min(xs_all), max(max(xs_all), min(xs_all) + 1)
        y0, y1 = min(ys_all), max(ys_all)
        y0, y1 = (y0 - 0.5, y1 + 0.5) if y1 - y0 < 1e-9 else (y0, y1)

        def px(x, y):
            return left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top)

        for k in range(5):
            yv = y0 + (y1 - y0) * k / 4
            _, ypx = px(x0, yv)
            img[int(ypx), left - 4:left] = (0, 0, 0)
            _text(img, 4, int(ypx) - 5, f"{yv:.3g}")
            xv = x0 + (x1 - x0) * k / 4
            xpx, _ = px(xv, y0)
            img[bottom:bottom + 4, int(xpx)] = (0, 0, 0)
            _text(img, int(xpx) - 8, bottom + 8, f"{xv:.0f}")
        for i, (name, (xs, ys)) in enumerate(series.items()):
            color = COLORS[i % len(COLORS)]
            points = [px(x, y) for x, y in zip(xs, ys)]
            for (a, b), (c, d) in zip(points, points[1:]):
                _line(img, a, b, c, d, color)
            if len(points) == 1:
                _line(img, points[0][0], points[0][1], points[0][0] + 1, points[0][1], color)
            img[top + 6 + 16 * i:top + 10 + 16 * i, right - 150:right - 130] = color
            _text(img, right - 124, top + 3 + 16 * i, name)
    _text(img, (left + right) // 2 - 10, height - 14, xlabel)
    write_png(path, img)
